"""Measure the memory of a block of code: exact tensor bytes by category, at the peak.

    report = measure(train_step, model=model, optimizer=optimizer)
    report.peak, report.weights, report.activations, report.seconds

How it works. A ``TorchDispatchMode`` sees every tensor that every operator creates (forward,
backward and optimizer step alike). Each new storage is counted when it appears and uncounted when
Python frees it (a weak reference on the storage), so the running total is the exact number of
tensor bytes alive, and the peak is its maximum. Storages are put in a category by *identity*, not
by heuristics: the model's parameters, buffers and quantization constants are **weights**; the
``.grad`` of a parameter is a **gradient** (marked by a post-accumulate-grad hook, which is only
registered on trainable parameters, so frozen and quantized models work); tensors in
``optimizer.state`` are **optimizer state**; everything else is **activations and temporaries**.

Some engines free memory without freeing a tensor: FSDP2 keeps each gathered parameter's tensor and shrinks its
storage to zero bytes between uses (``storage.resize_(0)``). The meter sees those resizes too (it wraps
``torch.UntypedStorage.resize_`` while it runs), so such a storage counts only while it holds bytes.

What it does not see: memory an operator allocates and frees inside its own C++ kernel (workspace
buffers), tensors created by other threads (the dispatch mode is per thread), and memory outside
tensors (the Python interpreter, CUDA context, allocator caching). On CUDA the report therefore also
carries ``torch.cuda.max_memory_allocated`` and ``memory_reserved``.

Tensors that existed before the block and are not the model's or the optimizer's (the input batch,
say) are counted from the moment the block first touches them: they are alive, just not new.

The breakdown is the one at the peak. For a block that loads a model, the peak may come before the
final weights exist (while full-precision tensors are being quantized); ``report.after`` is what is
alive when the block ends.

``measure(step, ..., timeline=True)`` also keeps ``report.timeline``: the live bytes of every category after
each allocation and free, and the phase each one happened in (forward, backward, optimizer step; the
micro-batch under accumulation), replayed from the same records as the peak, so its highest point is the
report's breakdown exactly. ``helpers.plots.timeline`` draws it. Off (the default), nothing is recorded.
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from .constants import MiB
from .memory_report import CATEGORIES, LABELS, MemoryReport, Timeline

# Lessons import the report type, its categories and MiB from here, beside measure().
__all__ = ["CATEGORIES", "LABELS", "MiB", "MemoryReport", "Meter", "Timeline", "cuda_memory_snapshot", "measure",
           "saved_for_backward", "tensor_bytes", "time_it", "unmetered", "weight_tensors"]


def _storage_key(t: torch.Tensor):
    t = getattr(t, "_local_tensor", t)  # a DTensor (FSDP2's sharded parameters): this rank's shard
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, meta-like or functional wrappers
        return None, None
    if st.device.type == "meta":
        return None, None
    return st._cdata, st


def _tensors_in(obj):
    """Yield every tensor inside nested containers, dataclass-like objects and bitsandbytes states."""
    seen = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set)):
            stack.extend(x)
        elif hasattr(x, "__dict__") and type(x).__module__.startswith(("bitsandbytes", "galore_torch")):
            stack.extend(vars(x).values())  # QuantState (absmax, code, nested state2), MatmulLtState, GaLoreProjector


def tensor_bytes(obj) -> int:
    """Exact bytes of the distinct tensor storages inside ``obj`` (nested containers, bitsandbytes states),
    each counted once: ``tensor_bytes(optimizer.state)`` is the optimizer state, shared tables included once."""
    storages = {}
    for t in _tensors_in(obj):
        key, storage = _storage_key(t)
        if key is not None:
            storages[key] = storage.nbytes()
    return sum(storages.values())


def weight_tensors(model: torch.nn.Module):
    """Parameters, buffers and the quantization constants bitsandbytes keeps beside its weights."""
    for p in model.parameters():
        yield p
        for attr in ("quant_state", "SCB", "CB"):  # Params4bit / Int8Params side tensors
            extra = getattr(p, attr, None)
            if extra is not None:
                yield from _tensors_in(extra)
    yield from model.buffers()
    for module in model.modules():
        state = getattr(module, "state", None)  # bnb Linear8bitLt keeps a MatmulLtState
        if state is not None and type(state).__module__.startswith("bitsandbytes"):
            yield from _tensors_in(state)


class _Tracker(TorchDispatchMode):
    """Logs every storage's birth and death on one device type; the peak is found afterwards.

    Each allocation gets its own record ``[nbytes, category, born, died]`` (event numbers). The
    category is the last one the storage was given, so a temporary later adopted as a ``.grad`` or
    as optimizer state is filed there, also for the moments before it was adopted.
    """

    def __init__(self, device_type: str, timeline: bool = False):
        super().__init__()
        self.device_type = device_type
        self.records: list[list] = []
        self.live: dict[int, int] = {}  # storage key -> record index
        self.refs: dict[int, weakref.ref] = {}
        self.clock = 0
        self.timeline = timeline
        self.phase_marks: list[tuple[int, str]] = []  # (clock, phase) at each change: the peak's moment, the timeline
        self.peak_clock = 0  # the clock of the peak (peak_breakdown)
        self.in_step = False
        self.start_clock = 0  # the clock when the measured block began (set by Meter)

    def set_phase(self, phase: str) -> None:
        """Note that the events from now on belong to ``phase``."""
        if not self.phase_marks or self.phase_marks[-1][1] != phase:
            self.phase_marks.append((self.clock, phase))

    def _current_phase(self) -> str:
        if self.in_step:
            return "optimizer step"
        # The autograd engine runs a graph task during backward (recomputed checkpoints included).
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def add(self, t: torch.Tensor, category: str | None = None) -> None:
        key, st = _storage_key(t)
        if key is None or st.device.type != self.device_type:
            return
        idx = self.live.get(key)
        nbytes = st.nbytes()
        if idx is not None and nbytes != self.records[idx][0]:  # resized in place
            self._free(key, keep_ref=True)
            idx = None
        if idx is None:
            self.clock += 1
            idx = len(self.records)
            self.records.append([nbytes, category or "activations", self.clock, None])
            self.live[key] = idx
            if key not in self.refs:
                self.refs[key] = weakref.ref(st, lambda _r, k=key: self._free(k))
        elif category is not None:
            self.records[idx][1] = category

    def mark(self, tensors, category: str) -> None:
        for t in tensors:
            self.add(t, category)

    def resized(self, storage) -> None:
        """``storage`` changed size in place (``resize_``): it ends the old allocation and, unless now empty,
        starts one of the new size in the same category."""
        key = storage._cdata
        idx = self.live.get(key)
        if idx is None or storage.device.type != self.device_type or storage.nbytes() == self.records[idx][0]:
            return
        category = self.records[idx][1]
        self._free(key, keep_ref=True)
        if storage.nbytes():
            self.clock += 1
            self.live[key] = len(self.records)
            self.records.append([storage.nbytes(), category, self.clock, None])

    def _free(self, key: int, keep_ref: bool = False) -> None:
        idx = self.live.pop(key, None)
        if not keep_ref:
            self.refs.pop(key, None)
        if idx is not None:
            self.clock += 1
            self.records[idx][3] = self.clock

    def current(self) -> int:
        return sum(self.records[i][0] for i in self.live.values())

    def peak_breakdown(self) -> dict[str, int]:
        """Replay births and deaths; return the breakdown at the largest total."""
        events = []
        for i, (nbytes, _cat, born, died) in enumerate(self.records):
            events.append((born, nbytes, i))
            if died is not None:
                events.append((died, -nbytes, i))
        events.sort()
        total, best, best_clock = 0, -1, 0
        for clock, delta, _i in events:
            total += delta
            if total > best:
                best, best_clock = total, clock
        self.peak_clock = best_clock
        out = dict.fromkeys(CATEGORIES, 0)
        for nbytes, cat, born, died in self.records:
            if born <= best_clock and (died is None or died > best_clock):
                out[cat] += nbytes
        return out

    def moment_of_peak(self) -> str | None:
        """The moment of the peak (after ``peak_breakdown``) in ``helpers.estimate``'s words: "forward", "backward
        start" (no gradient made yet in this backward), "backward" (some made), "backward end" (all made) or
        "optimizer step", with ", accumulating" in a later micro-batch of an accumulated step; None for a block
        that is not a training step (no backward, no optimizer step), such as loading a model or generating."""
        if not any(phase != "forward" for _, phase in self.phase_marks):
            return None
        before = [(clock, name) for clock, name in self.phase_marks if clock < self.peak_clock]
        phase, began = before[-1][::-1] if before else ("forward", self.start_clock)
        moment = phase
        if phase == "backward":
            ends = min((clock for clock, _ in self.phase_marks if clock >= self.peak_clock), default=self.clock)
            grads = [born for _, cat, born, _ in self.records if cat == "gradients" and began < born <= ends]
            if not any(born <= self.peak_clock for born in grads):
                moment = "backward start"  # no gradient of this backward yet
            elif not any(born > self.peak_clock for born in grads):
                moment = "backward end"  # every gradient of this backward made
        # A later micro-batch of an accumulated step: an earlier backward already wrote gradients.
        if phase != "optimizer step" and any(name == "backward" and clock < began for clock, name in before):
            moment += ", accumulating"
        return moment

    def timeline_of(self) -> Timeline:
        """Replay births and deaths into live bytes by category after each event, with the phases."""
        start = self.start_clock
        events = sorted([(born, nbytes, cat) for nbytes, cat, born, _ in self.records if born > start] +
                        [(died, -nbytes, cat) for nbytes, cat, _, died in self.records
                         if died is not None and died > start])
        live = dict.fromkeys(CATEGORIES, 0)
        for nbytes, cat, born, died in self.records:
            if born <= start and (died is None or died > start):  # alive when the block began
                live[cat] += nbytes
        series: dict[str, list[int]] = {c: [] for c in CATEGORIES}
        clocks = []
        for clock, delta, cat in events:
            live[cat] += delta
            if clocks and clocks[-1] == clock:  # one event per clock; keep its final state
                for c in CATEGORIES:
                    series[c][-1] = live[c]
                continue
            clocks.append(clock)
            for c in CATEGORIES:
                series[c].append(live[c])
        if not clocks:  # nothing happened inside the block
            clocks = [0]
            for c in CATEGORIES:
                series[c].append(live[c])
        phases = _phase_spans(self.phase_marks, clocks)
        return Timeline(bytes=series, phases=phases)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        phase = self._current_phase()
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if tensors:  # an op that makes no tensor (loss.item()) does not start a phase
            self.set_phase(phase)
        for t in tensors:
            self.add(t)
        return out


_ACTIVE: list[_Tracker] = []  # trackers of the meters running now (nested meters each see every resize)
_plain_resize = torch.UntypedStorage.resize_


def _resize_seen(storage, size):
    out = _plain_resize(storage, size)
    for tracker in _ACTIVE:
        tracker.resized(storage)
    return out


def _phase_spans(marks: list[tuple[int, str]], clocks: list[int]) -> list[tuple[int, int, str]]:
    """(first event, last event, phase) spans for a timeline whose events happened at ``clocks``. A mark set at
    clock k names the events after it. With several forward passes before the step (gradient accumulation),
    forward and backward are numbered by micro-batch."""
    names, j, current = [], 0, marks[0][1] if marks else ""
    for clock in clocks:
        while j < len(marks) and marks[j][0] < clock:
            current = marks[j][1]
            j += 1
        names.append(current)
    spans: list[list] = []
    for i, name in enumerate(names):
        if spans and spans[-1][2] == name:
            spans[-1][1] = i
        else:
            spans.append([i, i, name])
    if sum(1 for span in spans if span[2] == "forward") > 1:
        micro = 0
        for span in spans:
            micro += span[2] == "forward"
            if span[2] in ("forward", "backward"):
                span[2] = f"{span[2]} {max(micro, 1)}"
    return [tuple(span) for span in spans]


def _device_of(model, optimizer) -> torch.device:
    if model is not None:
        for p in model.parameters():
            return p.device
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Meter:
    """The context-manager form: ``with Meter(model, optimizer) as m: ...``; then ``m.report``."""

    def __init__(self, model=None, optimizer=None, device=None, timeline: bool = False):
        self.model, self.optimizer, self.timeline = model, optimizer, timeline
        self.device = torch.device(device) if device is not None else _device_of(model, optimizer)
        self.report: MemoryReport | None = None

    def _classify(self, tracker: _Tracker) -> None:
        if self.model is not None:
            tracker.mark(weight_tensors(self.model), "weights")
            tracker.mark((p.grad for p in self.model.parameters() if p.grad is not None), "gradients")
        if self.optimizer is not None:
            tracker.mark(_tensors_in(list(self.optimizer.state.values())), "optimizer")

    def __enter__(self):
        self.tracker = _Tracker(self.device.type, timeline=self.timeline)
        self._classify(self.tracker)
        self.before = self.tracker.current()
        self.tracker.start_clock = self.tracker.clock
        self._handles = []
        if self.model is not None:
            for p in self.model.parameters():
                if p.requires_grad:  # hooks on frozen parameters are not allowed (and not needed)
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_step_begin))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_step))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if not _ACTIVE:
            torch.UntypedStorage.resize_ = _resize_seen
        _ACTIVE.append(self.tracker)
        self.tracker.__enter__()
        self._t0 = time.perf_counter()
        return self

    def mark(self, tensors, category: str) -> None:
        """File ``tensors`` under ``category`` for their whole life, from inside the block: how a sharding engine's
        own buffers (gradient partitions, fp32 master shards) are named before they are freed."""
        self.tracker.mark(_tensors_in(tensors), category)

    def _on_grad(self, p):
        if p.grad is not None:  # an optimizer stepped inside backward may have consumed it already
            self.tracker.add(p.grad, "gradients")

    def _on_step_begin(self, optimizer, *_):
        self.tracker.in_step = True
        self.tracker.set_phase("optimizer step")
        # What the optimizer consumes is a gradient, whoever made it: DDP's bucket views, FSDP's sharded .grad,
        # DeepSpeed's flat gradient partition.
        self.tracker.mark((p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None),
                          "gradients")

    def _on_step(self, optimizer, *_):
        self.tracker.mark(_tensors_in(list(optimizer.state.values())), "optimizer")
        self.tracker.in_step = False

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._t0
        self.tracker.__exit__(*exc)
        _ACTIVE.remove(self.tracker)
        if not _ACTIVE:
            torch.UntypedStorage.resize_ = _plain_resize
        for h in self._handles:
            h.remove()
        self._classify(self.tracker)
        self.seconds = seconds
        self.finish()
        return False

    def finish(self, result=None) -> MemoryReport:
        """Resolve the peak (after the block, so that late identities count) into a report."""
        if isinstance(result, torch.nn.Module) and self.model is None:
            self.tracker.mark(weight_tensors(result), "weights")  # a model built inside the block
        t = self.tracker
        self.report = MemoryReport(**t.peak_breakdown(), seconds=self.seconds,
                                   device=str(self.device), before=self.before, after=t.current(),
                                   returned=result, moment=t.moment_of_peak(),
                                   timeline=t.timeline_of() if self.timeline else None)
        if self.device.type == "cuda":
            self.report.cuda_max_allocated = torch.cuda.max_memory_allocated(self.device)
            self.report.cuda_reserved = torch.cuda.memory_reserved(self.device)
        return self.report


@contextmanager
def cuda_memory_snapshot(path="memory_snapshot.pickle", max_entries: int = 100_000):
    """PyTorch's own record of the CUDA caching allocator while the block runs, saved to ``path``: every
    allocation and free with its Python stack (``torch.cuda.memory._record_memory_history``, ``_dump_snapshot``).
    Drag the file onto https://pytorch.org/memory_viz to browse it. CUDA only: on the CPU use ``measure(...,
    timeline=True)``, which this course draws with ``helpers.plots.timeline``."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_memory_snapshot records the CUDA allocator and there is no CUDA device here: "
                           "use measure(..., timeline=True) and helpers.plots.timeline on the CPU")
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        yield path
    finally:
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)


@contextmanager
def unmetered():
    """Tensors made inside the block are invisible to an active ``measure``: for a referee's own bookkeeping
    (checking a gradient, say) during the block it measures."""
    with _disable_current_modes():
        yield


def measure(fn, model=None, optimizer=None, device=None, timeline: bool = False) -> MemoryReport:
    """Run ``fn()`` once and return its peak memory by category and its wall time.

    Pass the ``model`` and ``optimizer`` the block uses so their tensors are filed as weights,
    gradients and optimizer state. If ``fn`` returns a model (``measure(lambda: load_model())``), its
    tensors are filed as weights. The return value of ``fn`` is kept in ``report.returned``.
    With ``timeline=True``, ``report.timeline`` holds the bytes by category after every allocation and free
    (``Timeline``; ``helpers.plots.timeline`` draws it).
    Wall time includes the meter's own bookkeeping; use ``time_it`` for timings you compare.
    """
    meter = Meter(model, optimizer, device, timeline=timeline)
    with meter:
        result = fn()
    return meter.finish(result)


def time_it(fn, repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median and spread of ``fn()``'s wall time after ``warmup`` untimed calls (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median": times[len(times) // 2], "min": times[0], "max": times[-1], "repeats": repeats}


def _is_weight_cast(t: torch.Tensor) -> bool:
    """Is ``t`` a cast of a parameter (what autocast makes of a weight), possibly transposed? Follows the
    autograd graph: [TBackward0 ->] ToCopyBackward0 -> AccumulateGrad (a leaf that requires grad)."""
    fn = t.grad_fn
    if fn is not None and fn.name() == "TBackward0":
        fn = fn.next_functions[0][0]
    return (fn is not None and fn.name() == "ToCopyBackward0"
            and type(fn.next_functions[0][0]).__name__ == "AccumulateGrad")


def saved_for_backward(fn, model: torch.nn.Module) -> dict[str, int]:
    """Bytes the autograd graph saves for backward while ``fn()`` runs (a forward pass), by kind and dtype:
    {"activations, torch.float32": ..., "weight copies, torch.bfloat16": ...}. The model's own parameters and
    buffers are not counted (they are weights); each storage is counted once however often it is saved."""
    own = {_storage_key(t)[0] for t in weight_tensors(model)}
    seen: dict = {}

    def pack(t):
        key = _storage_key(t)[0]
        if key is not None and key not in own and key not in seen:
            kind = "weight copies" if _is_weight_cast(t) else "activations"
            seen[key] = (f"{kind}, {t.dtype}", t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    table: dict[str, int] = {}
    for kind, nbytes in seen.values():
        table[kind] = table.get(kind, 0) + nbytes
    return dict(sorted(table.items()))
