"""Run a notebook cell by cell in a fresh kernel: the one way the course's tools execute notebooks.

    from helpers.tools.runner import run_notebook

    result = run_notebook(nb, cwd=path.parent, cell_timeout=900)       # nb: read into memory, never written
    result.ok                  # every code cell ran without an error
    result.error               # the first failing cell: index, the section heading above it, ename, first line
    result.cells[i].seconds    # per code cell run: index, status, seconds, ename, evalue, stdout
    result.nb                  # the executed notebook (in memory), outputs included

``helpers.tools.course_report``, ``helpers.tools.grade``, ``helpers.tools.notebooks execute`` and
tests/test_student_notebooks.py all run notebooks through here. It is nbclient underneath (``NotebookClient``
runs each cell, its hooks time it and catch its reply; an ``AsyncKernelManager`` starts the kernel); what this
module adds is what those callers need on top:

- time limits: ``cell_timeout`` per cell and ``total_timeout`` for the whole run. A cell over its limit is
  interrupted; if it stops within ``interrupt_grace`` seconds the run goes on (status ``timeout``), if not the
  kernel is stopped (``stuck``). A kernel that dies gives ``dead``. ``stop_on_error`` ends the run at the first
  cell that is not ``ok``.
- where the kernel runs: ``cwd``, its environment (``kernel_env``: ``COURSE_PROGRESS=0`` by default, so
  progress bars do not fill saved outputs; ``COURSE_STRICT_CHECKS`` set, removed or inherited), a memory limit
  (``RLIMIT_DATA``, set in the kernel before Python starts), and for the grader's sandbox a ``launcher`` that
  wraps the kernel's command line (bubblewrap) with its connection over IPC sockets in ``ipc_dir``.
- ``max_output_bytes``: a cap on what one cell's outputs may hold in memory (the grader runs untrusted code).
- ``before_cell(index, n, total)``: called as code cell ``index`` (the ``n``-th of ``total``) starts;
  ``progress(cell_run, done, total)``: called after every code cell.
- the kernel's connection: IPC sockets in a private folder (mode 700) on Linux and macOS, not TCP on localhost, so
  no other local user can connect to it and ipykernel does not warn "Kernel is running over TCP without
  encryption" on every start (its one warning about the transport; the kernel's other output is untouched).

``NotebookRun`` is the same as a session: start the kernel, ``run_cells()``, then ``run_code(...)`` in the same
kernel (the grader reads each answer that way), then ``close()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty

from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbclient.util import ensure_async, run_sync

STATUSES = ("ok", "error", "timeout", "stuck", "dead")
INTERRUPT_GRACE = 10  # seconds a cell gets to stop after the interrupt at its time limit
_LOG = logging.getLogger("helpers.tools.runner")  # nbclient logs every timeout as an error: the result says it
_LOG.addHandler(logging.NullHandler())
_LOG.propagate = False


@dataclass
class CellRun:
    """One code cell's run. ``status``: ok, error (it raised), timeout (interrupted at its limit; the kernel lives
    on), stuck (it ignored the interrupt: the kernel was stopped) or dead (the kernel died)."""

    index: int  # position in nb.cells (markdown cells count), as JupyterLab numbers them from 0
    status: str = "ok"
    seconds: float = 0.0
    ename: str = ""
    evalue: str = ""
    stdout: str = ""
    limit: float | None = None  # the time limit it ran under, seconds

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        """One line: what went wrong (empty when nothing did)."""
        limit = f" ({self.limit:g} s)" if self.limit else ""
        if self.status == "error":
            line = first_line(self.evalue)
            return f"{self.ename}: {line}" if line else self.ename
        if self.status == "timeout":
            return f"timed out: the cell ran longer than its limit{limit} and was interrupted"
        if self.status == "stuck":
            return f"timed out: the cell ran longer than its limit{limit} and ignored the interrupt; kernel stopped"
        if self.status == "dead":
            return "the kernel died"
        return ""


@dataclass
class CellError:
    """Where a run first went wrong, said so that a reader can find it in JupyterLab."""

    index: int | None  # None: before any cell (the kernel did not start)
    heading: str | None  # the nearest markdown section heading above the cell
    ename: str
    message: str  # first line

    def __str__(self) -> str:
        where = "" if self.index is None else f"cell {self.index}" + (f" (in “{self.heading}”)" if self.heading
                                                                       else "") + ": "
        return where + self.message


@dataclass
class RunResult:
    nb: object  # the executed notebook
    cells: list[CellRun] = field(default_factory=list)  # the code cells that ran, in order
    seconds: float = 0.0  # from the kernel's start to the end of the last cell
    total: int = 0  # code cells the run had to run
    not_run: list[int] = field(default_factory=list)  # indexes of the code cells it did not reach
    stopped: str | None = None  # None (ran to the end), "error", "time" (total_timeout), "kernel", "start"
    error: CellError | None = None  # the first cell that was not ok (or the failed start)

    @property
    def ok(self) -> bool:
        return self.stopped is None and all(c.ok for c in self.cells)

    @property
    def slowest(self) -> CellRun | None:
        return max(self.cells, key=lambda c: c.seconds, default=None)


def first_line(text) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.+?)\s*#*\s*$")


def section_heading(nb, index: int) -> str | None:
    """The last markdown heading above cell ``index`` (the section a reader scrolls to), or None."""
    for cell in reversed(nb.cells[:index]):
        if cell.cell_type == "markdown":
            headings = [m.group(2) for m in map(_HEADING.match, cell.source.splitlines()) if m]
            if headings:
                return headings[-1]
    return None


def kernel_env(base: dict | None = None, *, strict_checks: bool | None = None, progress_bars: bool = False,
               pythonpath: Iterable = ()) -> dict[str, str]:
    """The kernel's environment: ``base`` (default: this process's), with

    - ``COURSE_PROGRESS=0`` unless ``progress_bars`` (saved outputs stay readable);
    - ``COURSE_STRICT_CHECKS``: ``True`` sets it to 1 unless ``base`` sets it already (a failing exercise check
      then raises), ``False`` removes it (the grader, student notebooks), ``None`` leaves ``base`` as it is;
    - ``pythonpath`` folders put first on ``PYTHONPATH``.
    """
    env = dict(os.environ if base is None else base)
    if not progress_bars:
        env["COURSE_PROGRESS"] = "0"
    if strict_checks is True:
        env.setdefault("COURSE_STRICT_CHECKS", "1")
    elif strict_checks is False:
        env.pop("COURSE_STRICT_CHECKS", None)
    extra = [str(p) for p in pythonpath]
    if extra:
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in extra]
        env["PYTHONPATH"] = os.pathsep.join([*extra, *paths])
    return env


def limits_preexec(memory_limit: int | None) -> Callable[[], None]:
    """For a child between fork and exec: its own session, and ``RLIMIT_DATA`` (soft and hard) before any Python
    runs, so no cell can raise it. It bounds the writable private memory (heap, anonymous mmaps: every tensor on
    the CPU); ``RLIMIT_AS`` is not used, since torch and the BLAS libraries reserve address space never touched."""
    def apply():
        with contextlib.suppress(OSError):  # already a session leader
            os.setsid()
        if memory_limit:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
    return apply


def _ipc_dir(folder: Path) -> Path | None:
    """``folder`` for the kernel's IPC sockets, or None (TCP) where there are none (Windows) or where a socket's
    path would be longer than a Unix socket address allows (about 100 bytes; a long ``TMPDIR``)."""
    if os.name != "posix" or len(str(folder / "kernel-65535")) > 100:
        return None
    return folder


def _message_bytes(msg: dict) -> int:
    content = msg.get("content", {})
    if "text" in content:
        return len(str(content["text"]))
    return sum(len(v) if isinstance(v, str) else len(json.dumps(v, default=str))
               for v in content.get("data", {}).values()) + len(str(content.get("traceback", "")))


class _Client(NotebookClient):
    """nbclient's client, with a cap on the outputs one cell may keep and a way back from a timed-out cell."""

    max_output_bytes: int | None = None
    _used = 0
    _capped = False

    def output(self, outs, msg, display_id, cell_index):
        if self.max_output_bytes is not None:
            self._used += _message_bytes(msg)
            if self._used > self.max_output_bytes:
                if not self._capped:
                    self._capped = True
                    from nbformat.v4 import new_output

                    outs.append(new_output("stream", name="stderr", text=f"[output cut at {self.max_output_bytes:,}"
                                                                         " bytes]\n"))
                return None
        return super().output(outs, msg, display_id, cell_index)

    async def after_timeout(self, grace: float) -> tuple[str, dict]:
        """Interrupt the kernel and wait ``grace`` s for the cell's reply: ("timeout", reply), or "stuck"/"dead"."""
        with contextlib.suppress(Exception):
            await ensure_async(self.km.interrupt_kernel())
        deadline = time.monotonic() + grace
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await ensure_async(self.kc.shell_channel.get_msg(timeout=min(left, 0.5)))
            except Empty:
                if not await ensure_async(self.km.is_alive()):
                    return "dead", {}
                continue
            if msg.get("msg_type") == "execute_reply":  # the one request in flight: the interrupted cell's
                return "timeout", msg.get("content", {})
        return "stuck", {}

    async def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            if self.kc is not None:
                self.kc.stop_channels()
        with contextlib.suppress(Exception):
            if self.km is not None and self.km.has_kernel:
                await ensure_async(self.km.shutdown_kernel(now=True))
        with contextlib.suppress(Exception):
            if self.km is not None:
                await ensure_async(self.km.cleanup_resources())


class NotebookRun:
    """One notebook in one fresh kernel: ``start()``, ``run_cells()``, ``run_code()`` (optional), ``close()``; or
    ``with NotebookRun(nb, ...) as run:``. See the module's docstring for the options."""

    def __init__(self, nb, *, cwd=None, cell_timeout: float | None = None, total_timeout: float | None = None,
                 env: dict | None = None, strict_checks: bool | None = None, progress_bars: bool = False,
                 pythonpath: Iterable = (), memory_limit: int | None = None,
                 launcher: Callable[[list[str]], list[str]] | None = None, ipc_dir=None, quiet_kernel: bool = False,
                 startup_timeout: float = 120, interrupt_grace: float = INTERRUPT_GRACE,
                 max_output_bytes: int | None = None,
                 before_cell: Callable[[int, int, int], None] | None = None,
                 progress: Callable[[CellRun, int, int], None] | None = None):
        self.nb = nb
        self.cwd = str(cwd or Path.cwd())
        self.cell_timeout, self.total_timeout = cell_timeout, total_timeout
        self.env = kernel_env(env, strict_checks=strict_checks, progress_bars=progress_bars, pythonpath=pythonpath)
        self.memory_limit, self.launcher, self.quiet_kernel = memory_limit, launcher, quiet_kernel
        self.ipc_dir = Path(ipc_dir) if ipc_dir else None
        self.startup_timeout, self.interrupt_grace = startup_timeout, interrupt_grace
        self.before_cell, self.progress = before_cell, progress
        self.client: _Client | None = None
        self._spec_dir: str | None = None
        self._limit: float | None = None
        self._reply: dict | None = None
        self.max_output_bytes = max_output_bytes
        self.started = None

    # --- the kernel -------------------------------------------------------------------------------------
    def _kernel_manager(self):
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import AsyncKernelManager

        self._spec_dir = tempfile.mkdtemp(prefix="course-kernel-")  # mode 700: the spec and, by default, the sockets
        ipc_dir = self.ipc_dir or _ipc_dir(Path(self._spec_dir))
        options = {}
        if ipc_dir is not None:
            options = dict(transport="ipc", ip=str(ipc_dir / "kernel"), connection_file=str(ipc_dir / "kernel.json"))
        if self.launcher is None and self.ipc_dir is None:
            return AsyncKernelManager(kernel_name="python3", **options)
        spec = Path(self._spec_dir) / "course-run"
        spec.mkdir()
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                "--HistoryManager.hist_file=:memory:"]
        # interrupt_mode "message": the interrupt travels over the control channel (a signal could not reach into a
        # sandbox's PID namespace).
        (spec / "kernel.json").write_text(json.dumps({
            "argv": self.launcher(argv) if self.launcher else argv, "display_name": "course run", "language": "python",
            "interrupt_mode": "message" if self.launcher else "signal"}))
        return AsyncKernelManager(kernel_name="course-run", kernel_spec_manager=KernelSpecManager(
            kernel_dirs=[self._spec_dir]), **options)

    def start(self) -> NotebookRun:
        """Start the kernel (raises if it does not start; everything it started is then stopped)."""
        self.client = _Client(self.nb, km=self._kernel_manager(), allow_errors=True, record_timing=False,
                              startup_timeout=int(math.ceil(self.startup_timeout)), log=_LOG,
                              timeout_func=lambda cell: self._limit,
                              on_cell_execute=self._on_cell_execute, on_cell_executed=self._on_cell_executed)
        self.client.max_output_bytes = self.max_output_bytes
        options = {"cwd": self.cwd, "env": self.env}
        if self.memory_limit:
            options["preexec_fn"] = limits_preexec(self.memory_limit)
        if self.quiet_kernel:  # start-up warnings and C-level prints would clutter the caller's terminal
            options.update(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started = time.perf_counter()
        try:
            self.client.start_new_kernel(**options)
            self.client.start_new_kernel_client()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def alive(self) -> bool:
        if self.client is None or self.client.km is None or self.client.kc is None:
            return False
        try:
            return bool(run_sync(self._is_alive)())
        except Exception:
            return False

    async def _is_alive(self):
        return await ensure_async(self.client.km.is_alive())

    def close(self) -> None:
        """Stop the kernel (at once) and remove what the run wrote; safe to call twice."""
        if self.client is not None:
            with contextlib.suppress(Exception):
                run_sync(self.client.shutdown)()
            self.client.kc = None
        if self._spec_dir:
            shutil.rmtree(self._spec_dir, ignore_errors=True)
            self._spec_dir = None

    def __enter__(self) -> NotebookRun:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- cells ------------------------------------------------------------------------------------------
    def _on_cell_execute(self, cell, cell_index):
        self._began = time.perf_counter()

    def _on_cell_executed(self, cell, cell_index, execute_reply):
        self._reply = (execute_reply or {}).get("content", {})

    def _execute(self, cell, index: int, limit: float | None) -> CellRun:
        run = CellRun(index, limit=limit)
        if not self.alive:
            run.status = "dead"
            return run
        self._limit, self._reply = limit, None
        self.client._used, self.client._capped = 0, False
        self._began = began = time.perf_counter()
        try:
            self.client.execute_cell(cell, index)
            reply = self._reply or {}
            if reply.get("status") == "error":
                run.status, run.ename, run.evalue = "error", str(reply.get("ename", "")), str(reply.get("evalue", ""))
        except CellTimeoutError:
            run.status, reply = run_sync(self.client.after_timeout)(self.interrupt_grace)
            run.ename, run.evalue = str(reply.get("ename", "")), str(reply.get("evalue", ""))
        except DeadKernelError:
            run.status = "dead"
        except Exception as err:  # the connection broke: a kernel gone, or a bug to report as the cell's error
            alive = self.alive
            run.status, run.ename, run.evalue = ("error" if alive else "dead"), type(err).__name__, str(err)
        run.seconds = time.perf_counter() - min(began, self._began)
        run.stdout = "".join(str(o.get("text", "")) for o in cell.get("outputs", [])
                             if o.get("output_type") == "stream" and o.get("name") == "stdout")
        if run.status in ("stuck", "dead"):
            self.close()
        return run

    def run_cells(self, stop_on_error: bool = True) -> RunResult:
        """Run every non-empty code cell in order under the time limits; the kernel stays up for ``run_code``."""
        if self.client is None:
            self.start()
        code = [(i, c) for i, c in enumerate(self.nb.cells) if c.cell_type == "code" and c.source.strip()]
        result = RunResult(self.nb, total=len(code))
        deadline = self.started + self.total_timeout if self.total_timeout else None
        for n, (index, cell) in enumerate(code):
            limit = self.cell_timeout or None
            if self.before_cell is not None:
                self.before_cell(index, n + 1, len(code))
            if deadline is not None:
                left = deadline - time.perf_counter()
                if left <= 0:
                    result.stopped = "time"
                    result.not_run = [i for i, _ in code[n:]]
                    break
                limit = min(limit, left) if limit else left
            run = self._execute(cell, index, limit)
            result.cells.append(run)
            if self.progress is not None:
                self.progress(run, n + 1, len(code))
            if not run.ok and result.error is None:
                result.error = CellError(index, section_heading(self.nb, index),
                                         run.ename if run.status == "error" else run.status, run.describe())
            if run.status in ("stuck", "dead") or (stop_on_error and not run.ok):
                result.stopped = "kernel" if run.status in ("stuck", "dead") else "error"
                result.not_run = [i for i, _ in code[n + 1:]]
                break
        result.seconds = time.perf_counter() - self.started
        return result

    def run_code(self, source: str, timeout: float | None = None) -> CellRun:
        """Run ``source`` in the same kernel, as a cell not kept in the notebook; its run (with its stdout)."""
        from nbformat.v4 import new_code_cell

        cell = new_code_cell(source)
        self.nb.cells.append(cell)
        try:
            return self._execute(cell, len(self.nb.cells) - 1, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self.nb.cells.remove(cell)


def run_notebook(nb, *, stop_on_error: bool = True, **options) -> RunResult:
    """Run ``nb`` (in memory; the notebook object gets the outputs) in a fresh kernel, then stop the kernel.

    Options: those of ``NotebookRun``. A kernel that does not start gives a result with ``stopped="start"``."""
    run = NotebookRun(nb, **options)
    try:
        run.start()
    except Exception as err:
        code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]
        message = first_line(f"the kernel did not start ({type(err).__name__}: {err})")
        return RunResult(nb, total=len(code), not_run=code, stopped="start",
                         error=CellError(None, None, type(err).__name__, message))
    try:
        return run.run_cells(stop_on_error=stop_on_error)
    finally:
        run.close()
