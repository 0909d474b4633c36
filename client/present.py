"""How results look on a terminal: the progress line, the summary table, the defense and
transfer tables, and the exit code of a verdict. Shared by `robustness submit` (the client)
and `robustness evaluate` (the engine, server side); imports only the contract."""

from __future__ import annotations

import sys
import time

from schemas.evaluation import EvaluationResult
from schemas.results import DefenseResult

# exit codes of `evaluate` and `submit` by verdict (2: bad input or a failed evaluation)
EXIT_CODES = {"passed": 0, "failed": 1, "inconclusive": 3}


def exit_code(verdict: str | None) -> int:
    return EXIT_CODES.get(verdict or "failed", 1)



class ProgressBar:
    """One line on stderr: stage, samples done, ETA; redrawn at most 5 times a second.

    Stages may interleave (an evaluation runs its attacks shard after shard), so a stage's
    elapsed time and ETA count only the time spent on that stage. A ``job_wide`` bar (a
    server's evaluation: done and total count the whole job while the stage shown changes)
    shows the time since its first report and the ETA given with each report instead.
    """

    def __init__(self, stream=None, job_wide: bool = False):
        self.stream = stream or sys.stderr
        self.job_wide = job_wide
        self.started: float | None = None
        self.stage: str | None = None
        self.last_call: float | None = None
        self.spent: dict[str, float] = {}
        self.last_draw = 0.0
        self.interactive = self.stream.isatty()
        self.reported_done: set[str] = set()

    def __call__(self, stage: str, done: int, total: int, eta: float | None = None) -> None:
        now = time.monotonic()
        self.started = now if self.started is None else self.started
        # the time since the previous report went into this stage's work
        since = now - self.last_call if self.last_call is not None else 0.0
        self.spent[stage] = self.spent.get(stage, 0.0) + since
        self.last_call = now
        if stage != self.stage:
            if self.stage in self.reported_done and self.interactive and not self.job_wide:
                self.stream.write("\n")  # keep the finished stage's line; else redraw over it
            self.stage = stage
        finished = done >= total
        if (not finished and now - self.last_draw < 0.2) or (finished and stage in self.reported_done):
            return
        if finished:
            self.reported_done.add(stage)
        self.last_draw = now
        elapsed = now - self.started if self.job_wide else self.spent[stage]
        if eta is None or not self.job_wide:
            eta = elapsed / done * (total - done) if done else float("nan")
        width = 24
        filled = int(width * done / total) if total else width
        line = (
            f"{stage:<18} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
            f"elapsed {elapsed:5.1f}s ETA {eta:5.1f}s"
        )
        if self.interactive:
            self.stream.write("\r" + line + "\x1b[K")  # erase what a longer line left
        elif finished:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive and self.stage is not None:
            self.stream.write("\n")


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


_GATE_STATUS = {"passed": "PASS", "failed": "FAIL", "inconclusive": "INCONCLUSIVE"}


def summary_table(result: EvaluationResult) -> str:
    lines = [
        f"clean accuracy {result.clean_accuracy:.4f} on {result.dataset['samples']} samples "
        f"({result.device}, {result.timing.get('total', 0):.1f}s)",
        "",
    ]
    header = (
        f"{'attack':<18} {'norm':<5} {'eps':>7} {'robust acc':>10} {'success':>8} "
        f"{'mean L2':>8} {'mean Linf':>9} {'median L2':>9}"
    )
    lines += [header, "-" * len(header)]
    for e in result.attacks:
        lines.append(
            f"{e.attack:<18} {e.norm or '-':<5} {_fmt(e.eps, 4):>7} "
            f"{_fmt(e.robust_accuracy, 4):>10} {_fmt(e.success_rate, 4):>8} "
            f"{_fmt(e.mean_l2):>8} {_fmt(e.mean_linf):>9} {_fmt(e.median_l2):>9}"
        )
    if result.fooling:
        noise = result.fooling.noise
        lines.append(
            f"\nfooling images: {noise.fooling_rate:.1%} of {noise.samples} uniform-noise "
            f"images labelled with confidence >= {noise.threshold}"
        )
        ascent = result.fooling.gradient_ascent
        if ascent:
            steps = "" if ascent.mean_steps is None else f" (mean {ascent.mean_steps:.1f} steps)"
            lines.append(f"gradient ascent from noise reached that confidence for "
                         f"{ascent.share_reached:.0%} of the classes{steps}")
    for warning in result.warnings:
        lines.append(f"warning: {warning}")
    if result.gates:
        lines.append("")
        for g in result.gates:
            bound = " and ".join(
                x
                for x in (
                    f">= {g.min}" if g.min is not None else "",
                    f"<= {g.max}" if g.max is not None else "",
                    f"at most {g.max_drop:g} below baseline {g.baseline}" if g.baseline is not None else "",
                )
                if x
            )
            where = f" {g.attack}" + (f" eps={g.eps:g}" if g.eps is not None else "") if g.attack else ""
            status = _GATE_STATUS[g.verdict or "failed"]
            if g.accepted_inconclusive:
                status = "PASS (inconclusive, allowed)"
            got = _fmt(g.value, 4) if g.value is not None else (g.reason or "-")
            if g.baseline_value is not None:
                got += f", baseline {_fmt(g.baseline_value, 4)}"
            elif g.reason and g.value is not None and (g.baseline is not None or g.verdict != "failed"
                                                       or g.accepted_inconclusive):
                got += f"; {g.reason}"
            lines.append(f"gate {status}: {g.metric}{where} {bound} (got {got})")
    return "\n".join(lines)


def defense_table(defenses: list[DefenseResult]) -> str:
    lines = [f"{'defense':<18}{'attack':<16}{'eps':>7}{'bare':>8}{'non-adaptive':>14}{'adaptive':>10}"
             f"{'worst case':>12}"]
    for defense in defenses:
        lines.append(f"{defense.defense:<18}{'clean':<16}{'':>7}{'':>8}{defense.clean_accuracy:>14.3f}")
        for row in defense.attacks:
            eps = "" if row.eps is None else f"{row.eps:g}"
            adaptive = "" if row.adaptive is None else f"{row.adaptive:.3f}" + (" !" if row.flagged else "")
            bare = "" if row.bare is None else f"{row.bare:.3f}"
            worst = "" if row.worst_case is None else f"{row.worst_case:.3f}"
            lines.append(f"{'':<18}{row.attack:<16}{eps:>7}{bare:>8}{row.non_adaptive:>14.3f}{adaptive:>10}"
                         f"{worst:>12}")
    return "\n".join(lines)


def transfer_table(table: list[list]) -> str:
    header, *rows = table
    width = max(len(str(row[0])) for row in table) + 2
    lines = ["".join([" " * width, *(f"{t:>9}" for t in header[1:-1]), "  av. distortion"])]
    for row in rows:
        cells = "".join(f"{100 * v:8.1f}%" for v in row[1:-1])
        distortion = "" if row[-1] is None else f"{row[-1]:16.4f}"
        lines.append(f"{str(row[0]):<{width}}{cells}{distortion}")
    return "\n".join(lines)


def print_result(result: EvaluationResult) -> None:
    """The summary table, then the defense and transfer tables of the sections that ran."""
    print(summary_table(result))
    if result.defenses:
        print(
            "\ndefenses: accuracy through each defense (non-adaptive: examples crafted on the bare model; "
            "adaptive: crafted against the defense; worst case: correct on both, per sample; "
            "! flags a large gap)"
        )
        print(defense_table(result.defenses))
    for entry in result.transfer or []:
        print(f"\ntransfer: {entry.attack} (error rates of the targets on examples crafted on each row)")
        print(transfer_table(entry.table))
    if result.certify is not None:
        print("\n" + certify_table(result.certify))


def certify_table(section) -> str:
    """certified <= true robust accuracy <= attacked, per method and budget."""
    if not section.available:
        return f"certify: not available: {section.reason}"
    lines = ["certify: certified accuracy (a lower bound) <= robust accuracy <= attacked (the attacks' "
             "lowest)",
             f"  {'method':11s} {'norm':5s} {'eps':>8s} {'certified':>10s} {'attacked':>9s} "
             f"{'certified':>9s} {'broken':>7s} {'unknown':>8s}"]
    for e in section.entries:
        attacked = "-" if e.attacked_accuracy is None else f"{e.attacked_accuracy:.3f}"
        lines.append(f"  {e.method:11s} {e.norm:5s} {e.eps:8.4g} {e.certified_accuracy:10.3f} {attacked:>9s} "
                     f"{e.certified:9d} {e.broken:7d} {e.unknown:8d}")
    return "\n".join(lines)
