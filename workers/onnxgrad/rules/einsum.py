"""Einsum: an operand's gradient is the Einsum of the output's gradient with the other operands,
broadcast over the letters that only that operand had (summed away in the forward)."""

from __future__ import annotations

import string

from ..autodiff import Context, attr, register, unsupported


def subscripts(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """The operands' and the output's letters, with every ellipsis spelled out in letters the
    equation does not use (right-aligned across operands, as numpy broadcasts them)."""
    equation = equation.replace(" ", "")
    left, arrow, right = equation.partition("->")
    terms = left.split(",")
    if len(terms) != len(ranks):
        raise ValueError(f"{len(terms)} operands in the equation, {len(ranks)} given")
    spare = [c for c in string.ascii_letters if c not in equation]
    widths = [rank - len(term.replace("...", "")) for term, rank in zip(terms, ranks, strict=True)]
    width = max([w for w, term in zip(widths, terms, strict=True) if "..." in term], default=0)
    ellipsis = "".join(spare[:width])
    spelled = [term.replace("...", ellipsis[width - w:]) for term, w in zip(terms, widths, strict=True)]
    if arrow:
        output = right.replace("...", ellipsis)
    else:  # implicit mode: the ellipsis, then the letters used once, in alphabetical order
        letters = "".join(spelled)
        once = sorted(c for c in set(left) if c.isalpha() and letters.count(c) == 1)
        output = ellipsis + "".join(once)
    return spelled, output


@register("Einsum", inputs="all")
def einsum(ctx, node, dy):
    g = ctx.g
    operands = list(node.input)
    ranks = [ctx.require_rank(name, node) for name in operands]
    try:
        terms, output = subscripts(attr(node, "equation"), ranks)
    except ValueError as exc:
        raise unsupported(node, str(exc)) from None
    _refuse_broadcasting(ctx, node, terms)
    grads: list[str | None] = []
    for k, (name, term) in enumerate(zip(operands, terms, strict=True)):
        if not ctx.needs(name):
            grads.append(None)
            continue
        if len(set(term)) != len(term):
            raise unsupported(node, f"operand {k} repeats a letter ({term!r}: a diagonal), which is "
                                    "not supported")
        others = [(output, dy[0])] + [(t, n) for j, (n, t) in enumerate(zip(operands, terms, strict=True))
                                      if j != k]
        seen = "".join(t for t, _ in others)
        kept = "".join(c for c in term if c in seen)
        grad = g.op("Einsum", *(n for _, n in others),
                    equation=",".join(t for t, _ in others) + "->" + kept)
        alone = [i for i, c in enumerate(term) if c not in seen]
        if alone:  # letters summed away in this operand alone: every element had slope 1 there
            grad = g.op("Expand", g.unsqueeze(grad, alone), g.shape(name))
        grads.append(grad)
    return grads


def _refuse_broadcasting(ctx: Context, node, terms: list[str]) -> None:
    """A letter of size 1 in one operand and another size elsewhere broadcasts; the gradient
    would have to be summed back, which this rule does not do."""
    sizes: dict[str, set] = {}
    for name, term in zip(node.input, terms, strict=True):
        shape = ctx.shape(name) or (None,) * len(term)
        for letter, dim in zip(term, shape, strict=True):
            sizes.setdefault(letter, set()).add(dim)
    for letter, dims in sizes.items():
        if 1 in dims and len(dims) > 1:
            raise unsupported(node, f"the operands broadcast along {letter!r} (sizes "
                                    f"{sorted(map(str, dims))}), which is not supported")
