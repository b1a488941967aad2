"""Progress while the learner waits: steps done and time left, in a live notebook only.

    for batch_size in progress([1, 2, 4, 8], desc="batch sizes"):   # a tqdm bar, or the list itself
        ...
    trainer = Trainer(..., callbacks=[TrainerProgress("fine-tune")])   # optimizer steps done, time left
    with progress(total=6, desc="capstone", unit="step") as bar:       # by hand
        ...; bar.update()

A bar is shown (``tqdm.auto``: the notebook widget in Jupyter, text in a terminal) when the setting
``COURSE_PROGRESS`` asks for it, or, when it is unset, in a notebook kernel and in a terminal. Anywhere else
(stderr redirected to a log file, pytest capturing output) it is off, and so is it with ``COURSE_PROGRESS=0``,
which the course's notebook runner sets for notebooks whose outputs are saved, graded or reported: their
outputs stay as they are, with no widget and no progress-bar debris. Off, ``progress`` returns a silent
stand-in with the same methods (``update``, ``set_postfix``, ``write``, ``close``...), so code never asks.
"""

from __future__ import annotations

import os
import sys

ENV = "COURSE_PROGRESS"  # "0" off, "1" on; unset: on in a notebook or a terminal, off elsewhere
_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}


def _in_notebook() -> bool:
    """True in a Jupyter kernel (JupyterLab, Notebook, VS Code, Colab): the test ``tqdm.auto`` uses."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 (an IPython too old or half-imported: not a notebook)
        return False
    return shell is not None and ("IPKernelApp" in getattr(shell, "config", {}) or "google.colab" in sys.modules)


def _in_terminal() -> bool:
    """True when tqdm's stream (stderr) is a terminal, where a bar redraws in place."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def enabled() -> bool:
    """Whether a bar is shown now: ``COURSE_PROGRESS`` if set (0/1), else in a notebook or a terminal."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    return _in_notebook() or _in_terminal()


class Silent:
    """What ``progress`` returns when it is off: iterates like its iterable, counts, and prints nothing but
    ``write``'s text (as ``print`` would)."""

    def __init__(self, iterable=None, total=None, desc=None, **_options):
        self.iterable, self.desc, self.n = iterable, desc, 0
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.total = total

    def __iter__(self):
        for item in self.iterable if self.iterable is not None else ():
            yield item
            self.n += 1

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        self.n += n

    def write(self, text: str, file=None, end: str = "\n") -> None:
        print(text, end=end, file=file or sys.stdout, flush=True)

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass

    def refresh(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable=None, total: int | None = None, desc: str | None = None, unit: str = "it", **options):
    """A ``tqdm.auto`` bar over ``iterable`` (or of ``total`` steps, updated by hand) when progress is on
    (``enabled``), else a ``Silent`` stand-in; ``options`` go to tqdm (``leave``, ``bar_format``...)."""
    if not enabled():
        return Silent(iterable, total=total, desc=desc)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, **options)


def write(text: str) -> None:
    """Print a line without breaking a bar that is showing (``tqdm.write``), flushed at once."""
    if enabled():
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(text, flush=True)


def _trainer_progress_class():
    from transformers import TrainerCallback

    class TrainerProgress(TrainerCallback):
        """A ``Trainer`` callback: one bar of optimizer steps done (of ``max_steps``), the time left and the last
        logged loss; for ``TrainingArguments(disable_tqdm=True)``, whose own bar is off. Shown by the main
        process only, and only where ``progress`` shows bars; closed when training ends."""

        def __init__(self, desc: str = "training"):
            self.desc = desc
            self.bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = progress(total=state.max_steps, desc=self.desc, unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    TrainerProgress.__module__ = __name__
    return TrainerProgress


def __getattr__(name):  # TrainerProgress is built on first use: importing transformers takes seconds
    if name == "TrainerProgress":
        cls = _trainer_progress_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
