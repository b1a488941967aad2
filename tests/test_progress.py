"""helpers.progress: bars in a live notebook, nothing under COURSE_PROGRESS=0 (saved, graded, reported outputs)."""

import subprocess
import sys

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from tqdm.std import tqdm as std_tqdm

import helpers.progress as progress_module
from helpers import capstone
from helpers.capstone import Workload
from helpers.constants import ROOT
from helpers.data import Corpus
from helpers.distributed.launch import _wait
from helpers.estimate import Dims
from helpers.finetune import fine_tune
from helpers.memory import CATEGORIES, MiB
from helpers.models import tiny_config, tiny_model
from helpers.progress import Silent, TrainerProgress, enabled, progress
from helpers.train import make_train_step

WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def notebook(monkeypatch):
    """As in a Jupyter kernel, with COURSE_PROGRESS unset."""
    monkeypatch.delenv("COURSE_PROGRESS", raising=False)
    monkeypatch.setattr(progress_module, "_in_notebook", lambda: True)


@pytest.fixture(scope="module")
def corpus(course_tokenizer):
    return Corpus(course_tokenizer, max_chars=60_000)


@pytest.fixture
def bars(monkeypatch):
    """Every bar ``progress`` makes, kept for the test to look at."""
    made = []

    def recording(*args, **kwargs):
        made.append(progress(*args, **kwargs))
        return made[-1]
    monkeypatch.setattr(progress_module, "progress", recording)  # TrainerProgress's
    monkeypatch.setattr(capstone, "progress", recording)  # attempt's
    return made


def test_off_under_course_progress_0_prints_nothing_even_in_a_notebook(notebook, monkeypatch, capfd):
    monkeypatch.setenv("COURSE_PROGRESS", "0")
    assert not enabled()
    bar = progress(range(3), desc="sweep")
    assert isinstance(bar, Silent) and list(bar) == [0, 1, 2] and bar.n == 3 and len(bar) == 3
    with progress(total=4, desc="by hand") as by_hand:
        by_hand.update(2)
        by_hand.set_postfix(loss=1.0)
        by_hand.refresh()
    assert by_hand.n == 2
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    bar.write("a table row")  # what a caller prints still prints, as print would
    assert capfd.readouterr().out == "a table row\n"


def test_on_in_a_notebook(notebook, capsys):
    assert enabled()
    bar = progress(range(3), desc="sweep")
    assert isinstance(bar, std_tqdm)  # tqdm.auto's bar: the widget in a real kernel (see the nbclient test)
    assert list(bar) == [0, 1, 2]
    assert "sweep: 100%" in capsys.readouterr().err


def test_outside_a_notebook_only_in_a_terminal_or_when_asked(monkeypatch):
    monkeypatch.delenv("COURSE_PROGRESS", raising=False)
    monkeypatch.setattr(progress_module, "_in_notebook", lambda: False)
    monkeypatch.setattr(progress_module, "_in_terminal", lambda: False)  # a log file: no bar debris
    assert not enabled() and isinstance(progress(total=2), Silent)
    monkeypatch.setattr(progress_module, "_in_terminal", lambda: True)
    assert enabled()
    monkeypatch.setattr(progress_module, "_in_terminal", lambda: False)
    monkeypatch.setenv("COURSE_PROGRESS", "1")
    assert enabled()


def test_the_trainer_callback_counts_optimizer_steps_and_closes(notebook, bars, corpus, capsys):
    fine_tune(tiny_model(vocab_size=49152), corpus, steps=3, lr=1e-3, batch_size=2, seq_len=16, eval_chunks=1)
    assert len(bars) == 1
    bar = bars[0]
    assert isinstance(bar, std_tqdm) and bar.total == 3 and bar.n == 3 and bar.desc.startswith("fine-tune")
    assert bar.disable  # closed (tqdm disables a bar when it closes)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err


def test_only_the_main_process_shows_a_trainer_bar(notebook):
    from transformers import TrainerControl, TrainerState

    callback = TrainerProgress()
    callback.on_train_begin(None, TrainerState(max_steps=5, is_world_process_zero=False), TrainerControl())
    assert callback.bar is None


def test_the_trainer_callback_is_silent_under_course_progress_0(monkeypatch, bars, corpus, capsys):
    monkeypatch.setenv("COURSE_PROGRESS", "0")
    fine_tune(tiny_model(vocab_size=49152), corpus, steps=2, lr=1e-3, batch_size=2, seq_len=16, eval_chunks=1)
    assert len(bars) == 1 and isinstance(bars[0], Silent) and bars[0].n == 2
    err = capsys.readouterr().err
    assert "fine-tune" not in err and "step/s" not in err and "s/step" not in err


def test_launch_waits_with_a_ticking_line_and_still_times_out(notebook, capsys):
    assert _wait(subprocess.Popen([sys.executable, "-c", "pass"]), 30, "quick") is False
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _wait(slow, 2.5, "zero1 + zero2") is True
    finally:
        slow.kill()
        slow.wait()
    err = capsys.readouterr().err
    assert "zero1 + zero2: 00:0" in err and "elapsed (time limit 2 s)" in err


TINY = dict(vocab_size=49152, intermediate_size=128)
JOB = Workload(batch_size=2, seq_len=32, optimizer_steps=2, eval_chunks=1, budget=500 * MiB, quality=1.5)


def _lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(**TINY), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer, lambda batch: make_train_step(model, optimizer, batch, gradient_checkpointing=True)()


def test_a_capstone_attempt_measures_the_same_bytes_with_progress_on_and_off(monkeypatch, bars, capsys):
    monkeypatch.setattr(capstone, "course_dims", lambda: Dims.of(tiny_config(**TINY)))
    runs = {}
    for setting in ("0", "1"):  # "1": a real tqdm bar, and its monitor thread, during every step
        monkeypatch.setenv("COURSE_PROGRESS", setting)
        run = capstone.attempt(_lora, JOB, reference=False)
        assert run.problems == []
        runs[setting] = [{c: getattr(r, c) for c in CATEGORIES} for r in run.reports]
    assert runs["0"] == runs["1"] and len(runs["0"]) == 2
    assert isinstance(bars[0], Silent) and isinstance(bars[1], std_tqdm) and bars[1].n == bars[1].total == 2
    assert "_lora: 100%" in capsys.readouterr().err


def _executed(monkeypatch, setting):
    """A two-cell notebook run in a real kernel (as in JupyterLab), with COURSE_PROGRESS as given."""
    if setting is None:
        monkeypatch.delenv("COURSE_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("COURSE_PROGRESS", setting)
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("from helpers.progress import progress\n"
                                  "for i in progress(range(3), desc='sweep'):\n    pass"),
        nbformat.v4.new_code_cell("print('done')"),
    ])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return [out for cell in nb.cells for out in cell.outputs]


def test_a_live_notebook_shows_the_widget_and_a_saved_run_shows_nothing(monkeypatch):
    live = _executed(monkeypatch, None)
    widgets = [o for o in live if WIDGET in o.get("data", {})]
    assert widgets and widgets[-1]["data"]["text/plain"].startswith("sweep:")  # the widget: tqdm.notebook's bar
    saved = _executed(monkeypatch, "0")
    assert [o.get("text") for o in saved] == ["done\n"]


def test_the_benchmark_prints_its_rows_as_before_and_counts_cases_on_a_bar(monkeypatch, capsys):
    from helpers.tools import benchmark

    monkeypatch.setattr(benchmark, "measure_one_process", lambda recipe, corpus: 100 * MiB)
    monkeypatch.setattr("helpers.data.Corpus", lambda tokenizer: "corpus")  # run imports both when it runs
    monkeypatch.setattr("helpers.models.load_tokenizer", lambda: None)
    printed = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("COURSE_PROGRESS", setting)
        rows = benchmark.run(["full", "full_sgd"])
        printed[setting] = capsys.readouterr()
    assert printed["0"].out == printed["1"].out == "".join(benchmark._row(r) + "\n" for r in rows)
    assert printed["0"].err == "" and "benchmark cases: 100%" in printed["1"].err and "2/2" in printed["1"].err
