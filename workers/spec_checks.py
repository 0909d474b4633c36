"""An evaluation spec against the engine's registries: known attacks and defenses, their
parameters, and what each class says of itself (targeted variants, budgets, fitting, models,
noise magnitudes). The contract (schemas/) checks only what it can see in the spec alone.

Everything here raises InvalidSpecError (a UserError: a 422 on the service, exit 2 on the
command line) naming the field, e.g. ``attacks[2] (pgd): `steps` must be a positive integer``.
"""

from __future__ import annotations

import inspect

from schemas.evaluation import AttackSpec, DefenseSpec, EvaluationSpec, TransferSpec
from workers.attacks import ATTACKS, Attack
from workers.defenses import DEFENSES, Defense, build_defense
from workers.errors import InvalidSpecError, UserError


def build_attack(spec: AttackSpec) -> Attack:
    """The attack object a spec entry describes; its constructor validates the parameters."""
    if spec.name not in ATTACKS:
        raise InvalidSpecError(f"unknown attack {spec.name!r}; choose one of {', '.join(sorted(ATTACKS))}")
    cls = ATTACKS[spec.name]
    params = spec.params()
    if spec.norm is not None:
        if spec.norm not in cls.norms:
            allowed = f"one of {', '.join(cls.norms)}" if cls.norms else "none: remove `norm`"
            raise InvalidSpecError(f"`norm` must be {allowed} for {spec.name}, got {spec.norm!r}")
        if len(cls.norms) > 1:  # one norm: nothing to choose
            params["norm"] = spec.norm
    if spec.target_mode is not None and not cls.targeted_capable:
        raise InvalidSpecError(f"{spec.name} has no targeted variant; remove `targeted` / `targets`")
    if not cls.minimal and spec.eps is None:
        raise InvalidSpecError(f"{spec.name} needs `eps`, its budget(s)")
    if cls.minimal and spec.eps is not None:
        raise InvalidSpecError(f"{spec.name} finds minimal perturbations and takes no `eps`")
    accepted = _parameters(cls)
    unknown = [name for name in params if name not in accepted]
    if unknown:
        raise InvalidSpecError(f"{spec.name} has no parameter {', '.join(map(repr, unknown))}; its "
                               f"parameters: {', '.join(sorted(accepted)) or 'none'}")
    return cls(**params)


def _parameters(cls: type) -> set[str]:
    """The keyword parameters of a class's constructor."""
    return {name for name, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def defense_class(entry: DefenseSpec) -> type[Defense]:
    return DEFENSES[entry.name]


def check_spec(spec: EvaluationSpec) -> EvaluationSpec:
    """Raise InvalidSpecError naming the first field the registries refuse; return the spec."""
    for index, attack in enumerate(spec.attacks):
        _check_attack(attack, f"attacks[{index}]")
    if spec.transfer is not None:
        _check_transfer(spec.transfer)
    for index, defense in enumerate(spec.defenses):
        _check_defense(defense, f"defenses[{index}]")
    return spec


def _check_attack(attack: AttackSpec, where: str) -> None:
    if attack.name not in ATTACKS:
        raise InvalidSpecError(f"{where}.name: unknown attack {attack.name!r}; "
                               f"choose one of {', '.join(sorted(ATTACKS))}")
    try:
        build_attack(attack)
    except UserError as exc:
        raise InvalidSpecError(f"{where} ({attack.name}): {exc}") from None


def _check_transfer(transfer: TransferSpec) -> None:
    for index, attack in enumerate(transfer.attacks):
        where = f"transfer.attacks[{index}]"
        if attack.target_mode is not None:
            raise InvalidSpecError(f"{where}: transfer tables are of untargeted attacks; remove `targeted` / "
                                   "`targets`")
        _check_attack(attack, where)


def _check_defense(defense: DefenseSpec, where: str) -> None:
    if defense.name not in DEFENSES:
        raise InvalidSpecError(f"{where}.name: unknown defense {defense.name!r}; choose one of "
                               f"{', '.join(sorted(DEFENSES))}")
    cls = DEFENSES[defense.name]
    if cls.needs_model != (defense.model is not None):
        wanted = (f"the {cls.name} needs `model`, its .onnx" if cls.needs_model
                  else f"{cls.name} takes no `model`")
        raise InvalidSpecError(f"{where}.model: {wanted}")
    fit_sources = (defense.fit_samples is not None) + (defense.fit_dataset is not None)
    if cls.fitted and fit_sources != 1:
        raise InvalidSpecError(f"{where}.fit_samples: {cls.name} is fitted on held-out data: give either "
                               "`fit_samples` (the dataset's last samples) or `fit_dataset`")
    if not cls.fitted and fit_sources:
        raise InvalidSpecError(f"{where}.fit_samples: {cls.name} is not fitted; remove `fit_samples` / "
                               "`fit_dataset`")
    if defense.curve is not None and (cls.magnitude is None or any(m <= 0 for m in defense.curve)):
        noisy = ", ".join(sorted(name for name, c in DEFENSES.items() if c.magnitude is not None))
        raise InvalidSpecError(f"{where}.curve: positive noise magnitudes, for a defense with a magnitude "
                               f"({noisy}) only")
    if not cls.needs_model:
        try:
            build_defense(defense.name, **defense.params())
        except UserError as exc:
            raise InvalidSpecError(f"{where} ({defense.name}): {exc}") from None


def held_out_shortfall(spec: EvaluationSpec, dataset_samples: int) -> str | None:
    """Why a defense's ``fit_samples`` do not fit beside the evaluated samples in a dataset of
    ``dataset_samples`` (PCA is fitted on the dataset's last samples, held out from the
    evaluated first ones), or None when every one fits."""
    selected = dataset_samples if spec.samples == "all" else min(spec.samples, dataset_samples)
    for index, entry in enumerate(spec.defenses):
        if entry.fit_samples and selected + entry.fit_samples > dataset_samples:
            return (f"defenses[{index}].fit_samples: the dataset has {dataset_samples} samples; {selected} "
                    f"are evaluated and {entry.fit_samples} more are needed to fit {entry.name} on "
                    "held-out data; lower `samples` or `fit_samples`, or give a `fit_dataset`")
    return None
