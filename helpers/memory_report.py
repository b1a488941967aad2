"""What a measurement or a prediction returns: peak tensor bytes by category, and the timeline behind a peak.

Plain data, no torch: ``helpers.memory`` fills a ``MemoryReport`` by measuring, ``helpers.estimate`` by arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import MiB

CATEGORIES = ("weights", "gradients", "optimizer", "activations")
LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations and temporaries",
}


@dataclass
class MemoryReport:
    """Peak tensor bytes by category (at the moment of the peak) and the wall time of the block."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    before: int = 0  # live tracked bytes when the block started
    after: int = 0  # live tracked bytes when it ended (e.g. a loaded model's footprint)
    cuda_max_allocated: int | None = None
    cuda_reserved: int | None = None
    returned: object = field(default=None, repr=False, compare=False)  # what the measured block returned
    moment: str | None = field(default=None, compare=False)  # the moment of a step's peak, when known: moment_words
    timeline: Timeline | None = field(default=None, repr=False, compare=False)

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    total = peak

    def as_dict(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in CATEGORIES}

    def mib(self) -> dict[str, float]:
        out = {LABELS[c]: getattr(self, c) / MiB for c in CATEGORIES}
        out["peak"] = self.peak / MiB
        return out

    def largest(self) -> str:
        return max(CATEGORIES, key=lambda c: getattr(self, c))

    def __str__(self) -> str:
        parts = ", ".join(f"{LABELS[c]} {getattr(self, c) / MiB:,.1f}" for c in CATEGORIES)
        text = f"peak {self.peak / MiB:,.1f} MiB ({parts}) in {self.seconds:.2f} s on {self.device}"
        if self.cuda_max_allocated is not None:
            text += (f"; CUDA max_memory_allocated {self.cuda_max_allocated / MiB:,.1f} MiB, "
                     f"reserved {self.cuda_reserved / MiB:,.1f} MiB")
        return text

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{LABELS[c]}</td><td style='text-align:right'>{getattr(self, c) / MiB:,.1f}</td></tr>"
            for c in CATEGORIES)
        return (f"<table><tr><th>category</th><th>MiB at peak</th></tr>{rows}"
                f"<tr><td><b>peak</b></td><td style='text-align:right'><b>{self.peak / MiB:,.1f}</b>"
                f"</td></tr></table><small>{self.seconds:.2f} s on {self.device}</small>")


def moment_words(moment: str | None) -> str:
    """A peak's moment as a reader says it: "backward start" -> "start of backward", "block 3" -> "backward, block
    3", "forward end, accumulating" -> "end of forward (accumulating)"; "" when unknown. The moments are those
    ``helpers.estimate.predict`` names and ``helpers.memory.measure`` finds in a training step (forward,
    backward start, backward, backward end, optimizer step, each perhaps ", accumulating")."""
    if not moment:
        return ""
    name, _, rest = moment.partition(", ")
    words = {"backward start": "start of backward", "forward end": "end of forward", "backward end": "end of backward",
             "backward": "during backward", "forward": "during forward"}.get(name, name)
    if name.startswith("block "):
        words = f"backward, {name}"
    return f"{words} ({rest})" if rest else words


@dataclass
class Timeline:
    """Live tensor bytes by category after every allocation and free of a measured block (``measure(...,
    timeline=True)``). ``bytes[c][i]`` is category ``c`` after event ``i``; ``phases`` lists ``(first event, last
    event, name)`` spans: "forward", "backward", "optimizer step", numbered by micro-batch ("forward 2") when a
    block runs several forward passes before its optimizer step."""

    bytes: dict[str, list[int]]
    phases: list[tuple[int, int, str]]

    @property
    def events(self) -> int:
        return len(self.bytes[CATEGORIES[0]])

    def total(self, i: int) -> int:
        return sum(self.bytes[c][i] for c in CATEGORIES)

    @property
    def peak_event(self) -> int:
        """The first event at which the total is highest."""
        totals = [self.total(i) for i in range(self.events)]
        return max(range(self.events), key=lambda i: (totals[i], -i))

    def at(self, i: int) -> dict[str, int]:
        return {c: self.bytes[c][i] for c in CATEGORIES}

    def phase_of(self, i: int) -> str:
        return next((name for first, last, name in self.phases if first <= i <= last), "")
