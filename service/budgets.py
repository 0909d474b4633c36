"""What one evaluation may ask of the workers, and what one tenant may have queued.

Each attack parameter that multiplies the work has a bound (a setting), so does the size of
the spec, and so does the job's estimated cost (workers/cost.py). A request over a bound is a
422 naming the bound and the setting that raises it. A tenant whose queued and running jobs
would cost more than its quota gets a 429 with Retry-After: its earlier jobs must finish first.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from infra import jobs
from infra.records import Job
from infra.settings import Settings
from schemas.evaluation import AttackSpec, EvaluationSpec
from service.errors import ApiError, TooManyJobs
from workers.cost import Cost

# attack parameter -> the setting that bounds it
PARAMETER_BOUNDS = {
    "steps": "max_steps",
    "max_iter": "max_iterations",
    "search_steps": "max_iterations",
    "binary_search_steps": "max_iterations",
    "max_passes": "max_iterations",
    "restarts": "max_restarts",
    "repeats": "max_restarts",
    "queries": "max_queries",
    "square_queries": "max_queries",
}


class OverBudget(ApiError):
    status = 422
    type = "over_budget"


def env_name(setting: str) -> str:
    return f"ROBUSTNESS_{setting.upper()}"


def _over(what: str, value: int, setting: str, settings: Settings, advice: str) -> OverBudget:
    bound = getattr(settings, setting)
    name = env_name(setting)
    return OverBudget(f"{what} is {value:,}, over the bound of {bound:,} ({name} on the server); "
                      f"{advice}, or ask the operator to raise {name}")


def _entries(spec: EvaluationSpec) -> list[tuple[str, AttackSpec]]:
    entries = [(f"attacks[{i}]", a) for i, a in enumerate(spec.attacks)]
    if spec.transfer is not None:
        entries += [(f"transfer.attacks[{i}]", a) for i, a in enumerate(spec.transfer.attacks)]
    return entries


def check_parameter_bounds(spec: EvaluationSpec, settings: Settings) -> None:
    """Raise OverBudget for the first bound an attack's parameters pass. It runs before
    workers.spec_checks builds the attacks, whose constructors compute with the parameters, so
    only numbers are compared: the attacks refuse any other value."""
    entries = _entries(spec)
    if len(entries) > settings.max_attacks:
        raise _over("the number of attacks", len(entries), "max_attacks", settings,
                    "split the spec into several evaluations")
    for where, attack in entries:
        if attack.eps and len(attack.eps) > settings.max_eps_values:
            raise _over(f"{where}.eps: the number of budgets", len(attack.eps), "max_eps_values", settings,
                        "give fewer eps values")
        for name, value in attack.params().items():
            setting = PARAMETER_BOUNDS.get(name)
            if setting and _is_number(value) and value > getattr(settings, setting):
                raise _over(f"{where} ({attack.name}): `{name}`", value, setting, settings, "ask for fewer")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_cost(cost: Cost, settings: Settings) -> None:
    """Raise OverBudget when the job's estimated cost passes its bound."""
    if cost.total > settings.max_job_cost:
        largest = max(cost.parts, key=lambda part: cost.parts[part])
        raise _over("the estimated cost (model calls x samples)", cost.total, "max_job_cost", settings,
                    f"use fewer samples, budgets or steps (the largest part is {largest!r}: "
                    f"{cost.parts[largest]:,})")


def queued_cost(db: Session, tenant_id: str) -> int:
    """The estimated cost of the tenant's queued and running jobs."""
    total = db.scalar(
        select(func.coalesce(func.sum(Job.cost), 0))
        .where(Job.tenant_id == tenant_id, Job.state.in_(jobs.ACTIVE))
    )
    return int(total or 0)


def check_quota(db: Session, tenant_id: str, cost: Cost, settings: Settings) -> None:
    """429 when the tenant's queued and running work plus this job would pass its quota. Call it
    holding the tenant's admission lock (jobs.lock_admissions) until the job is added."""
    quota = settings.tenant_cost_quota
    if cost.total > quota:
        raise _over("the estimated cost (model calls x samples)", cost.total, "tenant_cost_quota", settings,
                    "use fewer samples, budgets or steps")
    queued = queued_cost(db, tenant_id)
    if queued + cost.total > quota:
        raise TooManyJobs(
            f"this tenant's queued and running evaluations cost {queued:,} (model calls x samples); with "
            f"this one ({cost.total:,}) that passes its quota of {quota:,} (ROBUSTNESS_TENANT_COST_QUOTA); "
            "retry once some have finished",
            type="over_quota",
            headers={"Retry-After": "30"},
        )
