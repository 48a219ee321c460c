"""Judge one candidate on one golden: the single verdict path of ``refghost compare``.

:func:`judge` reads the candidate (arrays from a file, or a model file run in its runtime on the
golden's input: :func:`refghost.verify.candidates.load_candidate`), chooses the precision policy
it is judged under, compares (:func:`refghost.verify.compare.compare`) and returns one
:class:`Judgement`. ``refghost compare FILE``, every task of a set (:mod:`.dataset`) and the
runtime tests call it.

The policy: ``Candidate.policy`` when it names one; ``auto`` takes the policy of the precision the
runtime reports (:attr:`refghost.runtimes.Precision.policy`), and float32 for arrays read from a
file (they say nothing of how they were computed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["Candidate", "Judgement", "choose_policy", "judge"]


@dataclass(frozen=True)
class Candidate:
    """A candidate (model file or dump) and how it is run and judged (small and picklable: a set
    sends it to its workers)."""

    path: str
    runtime: str | None = None  # None: by the file's extension
    precise: bool = False
    options: dict = field(default_factory=dict)
    threads: int = 1
    optimization: str = "all"  # ONNX Runtime's graph optimization level
    maps: dict = field(default_factory=dict)
    policy: str = "auto"
    atol: float | None = None
    rtol: float | None = None


@dataclass
class Judgement:
    """The verdict on one candidate: the comparison, the policy chosen and why, the provenance."""

    report: object  # refghost.verify.compare.Report (passed, first_divergent, every tensor)
    tensors: dict  # the candidate's tensors by module path or output name, as compared
    policy: str  # the policy judged under (a key of refghost.bounds.POLICIES)
    policy_reason: str  # why that policy
    candidate: str  # what was judged: the file, and the runtime, version and settings that ran it
    run: object | None = None  # the refghost.runtimes.RuntimeRun of a model file, None for arrays
    seconds: dict = field(default_factory=dict)  # "candidate" (read or run), "compare"
    #: the stages around the network the candidate gave arrays for (refghost.verify.stages records)
    stages: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        from .stages import FAIL

        return self.report.passed and not any(s.verdict == FAIL for s in self.stages)

    @property
    def first_divergent(self) -> str | None:
        """The input stage when it fails (everything after it inherits its difference), else the
        report's first divergent layer, else the first failing stage after the network."""
        from .stages import FAIL

        failed = [s.stage for s in self.stages if s.verdict == FAIL]
        if "input" in failed:
            return "input"
        return self.report.first_divergent or (failed[0] if failed else None)


def choose_policy(asked: str, precision=None, precise: bool = False) -> tuple[str, str, list[str]]:
    """``(policy, reason, notes)``: the policy a candidate is judged under. ``asked`` is a policy
    name or ``auto``; ``precision`` the :class:`~refghost.runtimes.Precision` its runtime
    reported (None: arrays from a file); ``precise``: whether it ran at its most precise settings."""
    if precision is None:
        if asked == "auto":
            return "float32", "arrays from a file say nothing of how they were computed: float32", []
        return asked, "--policy as asked", []
    reported = precision.policy
    if asked == "auto":
        notes = []
        if not precision.is_float32:
            hint = precision.remedy or ("" if precise else "--precise runs it at its most precise settings")
            notes.append(f"the runtime did not run in float32 ({precision.detail}): judged under --policy {reported}"
                         + (f"; {hint}" if hint else ""))
        return reported, f"the precision the runtime reports ({precision.detail})", notes
    notes = []
    if asked != reported:
        notes.append(f"the runtime reports {reported} precision ({precision.detail}); judged under --policy {asked} "
                     f"as asked")
    return asked, "--policy as asked", notes


def judge(candidate: Candidate, golden) -> Judgement:
    """Read or run ``candidate`` on ``golden`` and compare it under its policy (see the module
    docstring). Bad input raises :class:`~refghost.errors.CompareError` (or a subclass)."""
    from .candidates import load_candidate
    from .compare import compare

    t0 = time.perf_counter()
    loaded = load_candidate(candidate.path, golden, maps=candidate.maps, threads=candidate.threads,
                            optimization=candidate.optimization, runtime=candidate.runtime,
                            precise=candidate.precise, options=candidate.options)
    t1 = time.perf_counter()
    run = loaded.run
    policy, reason, notes = choose_policy(candidate.policy, run.precision if run is not None else None,
                                         candidate.precise)
    runtime = None
    if run is not None:
        runtime = run.summary()
        if candidate.policy == "auto":
            runtime["policy"] = policy
    report = compare(golden, loaded.tensors, policy=policy, atol=candidate.atol, rtol=candidate.rtol,
                     candidate_name=loaded.description, notes=[*loaded.notes, *notes], runtime=runtime,
                     separate_outputs=run is not None)
    from .stages import judge_stages

    stages = judge_stages(golden, loaded.tensors)
    seconds = {"candidate": t1 - t0, "compare": time.perf_counter() - t1}
    return Judgement(report, loaded.tensors, policy, reason, loaded.description, run, seconds, stages)
