"""Lesson 12's checks.

Exercise 1 is judged from plain data. Exercises 2 and 3 (the capstone's two tiers) share the referee
(``helpers.capstone.attempt``), tried on a tiny
random model with the course model's vocabulary, which these tests make "the course model" by patching
``helpers.capstone.course_dims``: each run costs a second or two, so every cheat gets its own run. One slow
test runs a real QLoRA setup on the course model, through the probe and the judge, as the grader does.
"""

import json
import math
import sys
import threading

import nbformat
import pytest
import torch
from casebook import BLANKS, COURSE, assert_grades, grade, registered
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from helpers import capstone
from helpers.capstone import SMALLEST_WORKLOAD, TIGHT_WORKLOAD, WORKLOAD, Workload
from helpers.checks import EXERCISES, FAIL, PASS, SKIP, plain, verdict
from helpers.constants import ROOT
from helpers.data import heldout_perplexity
from helpers.estimate import Dims, Recipe, lora_bytes, predict, rotary_buffer_bytes
from helpers.exercises import lesson12
from helpers.exercises.lesson12 import PLAN_RECIPE, SLIPS, probe_setup, probe_smallest_setup, probe_tight_setup
from helpers.loss import causal_lm_loss, next_token_targets
from helpers.memory import CATEGORIES, LABELS, MemoryReport, MiB, unmetered
from helpers.models import load_model, tiny_config, tiny_model
from helpers.train import make_train_step

pytestmark = pytest.mark.usefixtures("lenient_checks")

SOLUTION = ROOT / "solutions" / "12_fit_the_budget.ipynb"
STUDENT = ROOT / "notebooks" / "12_fit_the_budget.ipynb"


def test_every_registered_exercise_has_cases():
    assert registered("12") == {"capstone_prediction", "fit_the_budget", "fit_the_tight_budget",
                                "fit_the_smallest_budget"}
    assert EXERCISES["fit_the_smallest_budget"].probe is probe_smallest_setup
    assert EXERCISES["fit_the_budget"].probe is probe_setup and EXERCISES["fit_the_budget"].points == 3
    assert EXERCISES["fit_the_tight_budget"].probe is probe_tight_setup
    assert EXERCISES["capstone_prediction"].kind == "predict"
    assert EXERCISES["capstone_prediction"].tolerance == lesson12.TOLERANCE
    assert {EXERCISES[n].kind for n in ("fit_the_budget", "fit_the_tight_budget", "fit_the_smallest_budget")} == {
        "code"}
    assert (WORKLOAD.budget, TIGHT_WORKLOAD.budget, SMALLEST_WORKLOAD.budget) == (500 * MiB, 220 * MiB, 170 * MiB)
    assert SMALLEST_WORKLOAD.job() == WORKLOAD.job() and SMALLEST_WORKLOAD.quality == WORKLOAD.quality
    assert TIGHT_WORKLOAD.job() == WORKLOAD.job() and TIGHT_WORKLOAD.quality == WORKLOAD.quality


def test_the_notebook_plans_what_the_check_judges():
    """The solution builds its plan from the same job (helpers.capstone.WORKLOAD) as PLAN_RECIPE: they agree."""
    cells = [c.source for c in nbformat.read(SOLUTION, as_version=4).cells if c.cell_type == "code"]
    source = next(s for s in cells if "plan_recipe = Recipe(" in s)
    line = source[source.index("plan_recipe = Recipe("):source.index("### END SOLUTION")].split("\nplan_prediction")[0]
    space = {"Recipe": Recipe, "BATCH": WORKLOAD.batch_size, "SEQ": WORKLOAD.seq_len}
    exec(line, space)
    assert space["plan_recipe"] == PLAN_RECIPE
    assert (lesson12.BUDGET, lesson12.TIGHT_BUDGET, lesson12.BATCH, lesson12.SEQ) == (500 * MiB, 220 * MiB, 8, 128)
    assert any("check(\"capstone_prediction\", plan_prediction)" in s for s in cells)
    assert any("check(\"fit_the_budget\", my_setup)" in s for s in cells)
    assert any("check(\"fit_the_tight_budget\", tight_setup)" in s for s in cells)


def test_the_student_notebook_holds_no_recipe_but_the_failing_ones():
    """Every function of the student notebook that returns (model, optimizer, step) is one the lesson shows
    failing: the plan of exercise 1 (fits, learns too little). The course's own setups are solutions only."""
    import ast

    setups = []
    for cell in nbformat.read(STUDENT, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        lines = [line for line in cell.source.split("\n") if not line.lstrip().startswith(("%", "!"))]
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(r, ast.Return) and isinstance(r.value, ast.Tuple) and len(r.value.elts) == 3
                    for r in node.body):
                setups.append(node.name)
    assert setups == ["qv_setup"], setups
    solution = "\n".join(c.source for c in nbformat.read(SOLUTION, as_version=4).cells)
    assert "assert plan_run.fits and not plan_passed" in solution  # the lesson shows it fitting, and failing


# ------------------------------------------------------------------------------------------------
# Exercise 1: predicting the plan by category
# ------------------------------------------------------------------------------------------------
def as_mib(report, factor=1.0):
    return {c: factor * getattr(report, c) / MiB for c in CATEGORIES}


def test_capstone_prediction_grades_right_blank_and_wrong(dims):
    want = predict(dims, PLAN_RECIPE)
    right = as_mib(want)
    tolerance = {c: lesson12._tolerance(getattr(want, c)) / MiB for c in CATEGORIES}
    wrong = [(as_mib(predict(dims, slip)), hint.split(":")[0][:30]) for slip, hint in SLIPS
             if grade("capstone_prediction", as_mib(predict(dims, slip)), {"dims": dims}).status == FAIL
             or dims == COURSE]  # on a tiny model a few slips change nothing (8-bit AdamW keeps small tensors fp32)
    wrong += [
        (as_mib(want, 1.048576), "MB (10^6 bytes), not MiB"),  # every category in MB
        ({c: getattr(want, c) for c in CATEGORIES}, "bytes"),
        (as_mib(want, 1 / 1024), "GiB"),
        ({**right, "activations": 3 * right["activations"]}, "not within"),
        ({**right, "weights": right["weights"] - 2.2 * tolerance["weights"]}, "not within"),
        ({"weights": 162}, "missing"),
        ({**right, "kv cache": 3}, "unknown"),
        ({**right, "weights": "lots"}, "MiB of weights"),
        ({**right, "peak": 2 * sum(right.values())}, "not the sum"),
        (329.0, "dict"),
        ([right[c] for c in CATEGORIES], "dict"),
    ]
    assert_grades("capstone_prediction", right, wrong, context={"dims": dims})


def test_capstone_prediction_takes_predicts_report_its_mib_and_label_names(dims):
    want = predict(dims, PLAN_RECIPE)
    labelled = {LABELS[c]: getattr(want, c) / MiB for c in CATEGORIES}
    exact = {c: getattr(want, c) / MiB for c in CATEGORIES}
    for answer in (want, want.mib(), labelled, {**exact, "peak": want.peak / MiB}):
        assert grade("capstone_prediction", answer, {"dims": dims}).status == PASS, answer


def test_capstone_prediction_tolerance_is_two_decimals_and_no_more():
    """On the course model: every category rounded to two decimals of a MiB passes; each named slip fails."""
    want = predict(COURSE, PLAN_RECIPE)
    for rounding in (lambda x: math.floor(100 * x) / 100, lambda x: math.ceil(100 * x) / 100, lambda x: round(x, 2)):
        rounded = {c: rounding(getattr(want, c) / MiB) for c in CATEGORIES}
        assert grade("capstone_prediction", rounded, {"dims": COURSE}).status == PASS, rounded
    d = COURSE
    packed = d.layers * sum(o * i for o, i in d.linear_shapes()) / 2  # nf4: half a byte per weight
    adapters = lora_bytes(d, PLAN_RECIPE)
    no_constants = {**as_mib(want), "weights": (packed + d.unquantized_params * 4 + rotary_buffer_bytes(d)
                                                + adapters) / MiB}
    assert 1.5 < want.weights / MiB - no_constants["weights"] < 2  # the absmax constants: 1.8 MiB
    no_adapters = {**as_mib(want), "weights": (want.weights - adapters) / MiB}
    inputs = d.layers * PLAN_RECIPE.micro_batch_size * 128 * d.hidden * 4  # the checkpointed blocks' inputs
    no_inputs = {**as_mib(want), "activations": (want.activations - inputs) / MiB}
    one_decimal = {c: round(getattr(want, c) / MiB, 1) for c in CATEGORIES}  # gradients 1.76 -> 1.8: 2.4 % off
    for slip, word in ((no_constants, "weights"), (no_adapters, "weights"), (no_inputs, "activations"),
                       (as_mib(want, 1.048576), "MB"),
                       (as_mib(predict(d, PLAN_RECIPE.but(double_quant=False))), "absmax"),
                       (one_decimal, "gradients")):
        result = grade("capstone_prediction", slip, {"dims": COURSE})
        assert result.status == FAIL and result.points == 0 and word in result.message, (slip, result.message)


def test_capstone_prediction_reads_what_a_lying_dict_holds():
    want = as_mib(predict(COURSE, PLAN_RECIPE))

    class Liar(dict):  # holds zeros, says the right numbers
        def __getitem__(self, key):
            return want[key]

        def items(self):
            return want.items()

        def get(self, key, default=None):
            return want.get(key, default)

    result = grade("capstone_prediction", Liar(dict.fromkeys(CATEGORIES, 0.0)), {"dims": COURSE})
    assert result.status == FAIL and result.points == 0


def test_every_slip_is_a_different_prediction():
    want = predict(COURSE, PLAN_RECIPE)
    for slip_recipe, _ in SLIPS:
        slip = predict(COURSE, slip_recipe)
        assert any(abs(getattr(slip, c) - getattr(want, c)) > lesson12._tolerance(getattr(want, c))
                   for c in CATEGORIES), slip_recipe


# ------------------------------------------------------------------------------------------------
# Exercise 2, the judge alone: facts as the probe reports them
# ------------------------------------------------------------------------------------------------
def facts(report, steps=6, ppl_start=28.0, ppl_end=22.0, problems=(), **over):
    step = {**{c: int(getattr(report, c)) for c in CATEGORIES}, "seconds": 1.0}
    return {"steps": [dict(step) for _ in range(steps)], "ppl_start": ppl_start, "ppl_end": ppl_end,
            "seconds_per_step": 1.0, "losses": [3.0] * steps, "trainable": 1, "problems": list(problems), **over}


REF = {"ppl_pretrained": 28.28, "ppl_full_finetune": 21.86, "naive_peak": int(3428.5 * MiB)}  # as shipped, rounded


def judged(data, workload=WORKLOAD, reference=REF, name="fit_the_budget"):
    return verdict(name, plain(data), context={"workload": workload, "reference": reference})


FITS = MemoryReport(weights=179 * MiB, gradients=19 * MiB, optimizer=37 * MiB, activations=161 * MiB)


def test_the_judge_passes_what_fits_and_learns_and_says_its_numbers():
    result = judged(facts(FITS))
    assert result.status == PASS and result.points == 3, result.message
    for words in ("MiB of the 500 MiB budget", "every step measured", "perplexity 28.00 -> 22.00",
                  "1.006 x the full fine-tune's 21.86", "at most 1.05 x = 22.95",
                  "8.7 x smaller than naive fp32 AdamW"):
        assert words in result.message, (words, result.message)


def test_over_budget_says_which_categories_and_what_to_do():
    naive = predict(COURSE, Recipe(batch_size=8, seq_len=128))
    result = judged(facts(naive, ppl_end=21.9))
    assert result.status == FAIL and result.points == 0
    for words in ("Over budget", "optimizer state 1,026", "on its own more than the whole budget", "LoRA",
                  "weights 513"):
        assert words in result.message, (words, result.message)


def test_the_peak_is_the_largest_of_every_step():
    data = facts(FITS)
    data["steps"][0]["activations"] += 640 * MiB  # only the first step (the one a warm-up would hide)
    result = judged(data)
    assert result.status == FAIL and "Over budget" in result.message and "in step 1 of 6" in result.message


@pytest.mark.parametrize("change,words", [
    (dict(ppl_end=23.0), "did not learn enough"),  # 1.052 x the full fine-tune's 21.86: just over the bar
    (dict(ppl_end=25.0), "more target modules, or a higher rank"),  # 0.88 x the pretrained model's: not enough
    (dict(ppl_end=math.nan), "diverged"),
    (dict(ppl_end=math.inf), "diverged"),
    (dict(ppl_start=20.0), "before its first step"),
    (dict(steps=5), "ended after 5 of the job's 6 steps"),
    (dict(ppl_end=None), "ended after"),
    (dict(problems=["step 2 ran Python code in 1 other thread(s)"]), "other thread"),
    (dict(error="your function raised SystemExit: 0"), "SystemExit"),
])
def test_the_judge_fails_with_a_sentence(change, words):
    steps = change.pop("steps", 6)
    result = judged(facts(FITS, steps=steps, **change))
    assert result.status == FAIL and result.points == 0 and words in result.message, result.message


@pytest.mark.parametrize("data", [
    "passed", 3, ["steps"], {"steps": "all", "problems": []},
    {**facts(FITS), "steps": [{"weights": -1, "gradients": 0, "optimizer": 0, "activations": 0}] * 6},
    {**facts(FITS), "ppl_start": "low"}, {**facts(FITS), "problems": [3]},
])
def test_malformed_facts_get_a_sentence_and_no_points(data):
    result = judged(data)
    assert result.status == FAIL and result.points == 0 and result.message


def test_the_judge_uses_its_own_budget_and_reference_not_the_runs():
    lax = Workload(budget=10_000 * MiB, quality=10.0)
    data = facts(FITS, ppl_end=26.0, workload=lax.__dict__, reference={**REF, "ppl_full_finetune": 1e9},
                 budget=10_000 * MiB)
    assert judged(data).status == FAIL  # whatever the data says of itself, the lesson's 1.05 x 21.86 stands


def test_the_tiers_differ_only_in_budget():
    small = MemoryReport(weights=116 * MiB, gradients=9 * MiB, optimizer=5 * MiB, activations=81 * MiB)
    tight = {"workload": TIGHT_WORKLOAD, "name": "fit_the_tight_budget"}
    assert judged(facts(FITS)).status == PASS
    result = judged(facts(FITS), **tight)
    assert result.status == FAIL and "of the 220 MiB budget" in result.message
    assert "Over budget by 176" in result.message
    result = judged(facts(small), **tight)
    assert result.status == PASS and result.points == 2, result.message
    assert "16.2 x smaller than naive" in result.message, result.message
    assert judged(facts(small, ppl_end=23.0), **tight).status == FAIL  # the same quality bar
    smallest = {"workload": SMALLEST_WORKLOAD, "name": "fit_the_smallest_budget"}
    result = judged(facts(small), **smallest)
    assert result.status == FAIL and "of the 170 MiB budget" in result.message and "Over budget by 41" in result.message
    assert "chunks" in result.message  # what is left is the loss: lesson 10's chunked loss is named
    chunked = MemoryReport(weights=116 * MiB, gradients=9 * MiB, optimizer=5 * MiB, activations=25 * MiB)
    result = judged(facts(chunked), **smallest)
    assert result.status == PASS and result.points == 2 and "22.1 x smaller than naive" in result.message, \
        result.message
    assert judged(facts(chunked, ppl_end=23.0), **smallest).status == FAIL


def test_the_bar_is_relative_to_the_full_fine_tune_and_can_fail():
    """Anything that beats the pretrained model by 10 % passed the old bar; this one asks for 1.05 x full
    fine-tuning's perplexity after the same steps."""
    for ppl_end, status in ((REF["ppl_full_finetune"] * 1.049, PASS), (REF["ppl_full_finetune"] * 1.051, FAIL),
                            (0.85 * REF["ppl_pretrained"], FAIL)):
        assert judged(facts(FITS, ppl_end=ppl_end)).status == status, ppl_end


@pytest.mark.parametrize("reference", [None, {}, {**REF, "ppl_full_finetune": "low"}])
def test_a_judge_without_a_readable_reference_gives_no_points(reference):
    result = judged(facts(FITS), reference=reference)
    assert result.status == FAIL and result.points == 0


# ------------------------------------------------------------------------------------------------
# Exercise 2, the referee: real runs on a tiny model with the course model's vocabulary
# ------------------------------------------------------------------------------------------------
VOCAB = 49152
TINY = dict(vocab_size=VOCAB, intermediate_size=128)  # bitsandbytes' CPU packing needs multiples of 64
JOB = Workload(batch_size=2, seq_len=32, optimizer_steps=2, eval_chunks=1, budget=500 * MiB, quality=1.5)  # seconds


@pytest.fixture(scope="module")
def tiny_reference():
    return heldout_perplexity(tiny_model(**TINY), capstone.course_corpus(), max_chunks=JOB.eval_chunks)


@pytest.fixture
def tiny_course(tiny_reference, monkeypatch):
    """The tiny model is "the course model" for the referee; the pretrained perplexity is its own."""
    monkeypatch.setattr(capstone, "course_dims", lambda: Dims.of(tiny_config(**TINY)))
    return tiny_reference


def tiny_ref(ppl):
    """The tiny model's reference: its own pretrained perplexity, as the "full fine-tune's" too (JOB's bar: 1.5 x)."""
    return {"ppl_pretrained": ppl, "ppl_full_finetune": ppl, "naive_peak": 100 * MiB}


def run(setup, reference, workload=JOB):
    """What the grader does: the probe's data (plain, JSON-able, small), then the verdict on the lesson's terms."""
    data = plain(probe_setup(setup, workload))
    assert len(json.dumps(data)) < 100_000
    return verdict("fit_the_budget", data, context={"workload": workload, "reference": tiny_ref(reference)})


def lora(step_of=None, lr=1e-2, checkpointing=True, build=None):
    """A LoRA setup on the tiny model; ``step_of(model, optimizer, honest)`` makes a different step."""
    def setup():
        model = build() if build else get_peft_model(
            tiny_model(**TINY), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

        def honest(batch):
            return make_train_step(model, optimizer, batch, gradient_checkpointing=checkpointing,
                                   gradient_accumulation_steps=len(batch["input_ids"]))()
        return model, optimizer, (step_of(model, optimizer, honest) if step_of else honest)
    return setup


def full(lr=1e-3):
    def setup():
        model = tiny_model(**TINY)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        return model, optimizer, lambda batch: make_train_step(model, optimizer, batch)()
    return setup


def reentrant():
    model = get_peft_model(tiny_model(**TINY), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step(batch):  # its own loop: micro-batches of one row, all forwards before their backwards
        model.train()
        losses = [model(**{k: v[i:i + 1] for k, v in batch.items()}, use_cache=False).loss / 2 for i in range(2)]
        sum(losses).backward()
        optimizer.step()
        optimizer.zero_grad()
        return sum(losses)
    return model, optimizer, step


def token_normalised():
    """The lesson's own step: micro-batches of one row, the loss normalised by the step's target tokens."""
    model = get_peft_model(tiny_model(**TINY), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step(batch):
        model.train()
        micro = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
        targets = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
        total = 0.0
        for mb in micro:
            loss = model(**mb, use_cache=False, num_items_in_batch=targets).loss
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total
    return model, optimizer, step


@pytest.mark.parametrize("setup", [lora(), lora(checkpointing=False), full(), reentrant, token_normalised],
                         ids=["lora+checkpointing", "lora", "full fine-tune", "reentrant, own loop",
                              "token-normalised micro-batches"])
def test_honest_setups_pass_with_every_step_measured(tiny_course, setup):
    data = plain(probe_setup(setup, JOB))
    assert len(data["steps"]) == JOB.optimizer_steps and data["problems"] == [] and data["ppl_end"] < data["ppl_start"]
    assert all(set(CATEGORIES) <= set(step) for step in data["steps"])
    result = verdict("fit_the_budget", data, context={"workload": JOB, "reference": tiny_ref(tiny_course)})
    assert result.status == PASS and result.points == 3, result.message
    assert "every step measured" in result.message


def big_except_measured(model, optimizer, honest):
    calls = []

    def step(batch):  # 640 MiB more, except in the second call (the one a one-step referee measured)
        calls.append(torch.empty(640 * MiB if len(calls) != 1 else 0, dtype=torch.uint8))
        loss = honest(batch)
        calls[-1] = None
        return loss
    return step


def one_row_after_a_look(model, optimizer, honest):
    def step(batch):  # shows the referee every row without gradients, then trains on one
        with torch.no_grad():
            model(**batch)
        return honest({k: v[:1] for k, v in batch.items()})
    return step


def loss_multiplied_away(model, optimizer, honest):
    def step(batch):  # every row through the model, but only the first row's loss counts
        model.train()
        logits = model(**batch, use_cache=False).logits[:, :-1]
        per_row = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                    batch["labels"][:, 1:].reshape(-1),
                                                    reduction="none").view(len(logits), -1).mean(1)
        loss = per_row[0] + 1e-30 * per_row[1:].sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss
    return step


def rows_shown_through_the_embedding(model, optimizer, honest):
    def step(batch):  # the other rows' gradients reach the embedding and the output layer, but no block
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        for i in range(1, len(batch["input_ids"])):
            head(embedding(batch["input_ids"][i:i + 1]).requires_grad_()).sum().backward()
        optimizer.zero_grad()
        return honest({k: v[:1] for k, v in batch.items()})
    return step


def in_a_thread(model, optimizer, honest):
    def step(batch):
        out = []
        worker = threading.Thread(target=lambda: out.append(honest(batch)))
        worker.start()
        worker.join()
        return out[0]
    return step


def in_a_raw_thread(model, optimizer, honest):
    import _thread

    def step(batch):  # no threading.Thread object: only the interpreter knows it
        out, done = [], threading.Event()
        _thread.start_new_thread(lambda: (out.append(honest(batch)), done.set()), ())
        done.wait()
        return out[0]
    return step


def with_the_meter_off(model, optimizer, honest):
    def step(batch):
        with unmetered():
            return honest(batch)
    return step


def forks(model, optimizer, honest):
    import os

    def step(batch):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return honest(batch)
    return step


def runs_a_process(model, optimizer, honest):
    import subprocess

    def step(batch):
        subprocess.run([sys.executable, "-c", "import time; time.sleep(0.2)"], check=True)
        return honest(batch)
    return step


def drops_blocks(model, optimizer, honest):
    def step(batch):  # a shallower model is cheaper to train
        decoder = model.base_model.model.model
        decoder.layers = torch.nn.ModuleList(list(decoder.layers)[:1])
        return honest(batch)
    return step


def no_update(model, optimizer, honest):
    def step(batch):
        model.train()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.zero_grad()
        return loss
    return step


def idle_on_one_call(model, optimizer, honest):
    calls = []

    def step(batch):  # trains on every call but the second (a referee measuring one step would measure nothing)
        calls.append(1)
        return 0.0 if len(calls) == 2 else honest(batch)
    return step


def half_the_rows_on_one_call(model, optimizer, honest):
    calls = []

    def step(batch):  # every row on the first call, then only half of them
        calls.append(1)
        return honest(batch if len(calls) == 1 else {k: v[:len(v) // 2] for k, v in batch.items()})
    return step


def forward_only(model, optimizer, honest):
    def step(batch):  # reads every row with gradients on, but never back-propagates: the weights stay put
        model.train()
        return model(**batch, use_cache=False).loss.item()
    return step


def exits(model, optimizer, honest):
    def step(batch):
        raise SystemExit(0)
    return step


def patches_the_meter(model, optimizer, honest):
    from helpers import memory

    def step(batch):
        memory._Tracker.__torch_dispatch__ = lambda self, func, types, args=(), kwargs=None: func(*args, **kwargs or {})
        return honest(batch)
    return step


def lying_loss(model, optimizer, honest):
    class Loss(float):
        def __float__(self):
            raise SystemExit("a loss that ends the check")
    return lambda batch: Loss(honest(batch))


CHEATS = {
    "640 MiB except in the second step": (big_except_measured, "Over budget"),
    "one row after a no-grad look at all": (one_row_after_a_look, "did not contribute to the gradients"),
    "other rows' loss multiplied by 1e-30": (loss_multiplied_away, "did not contribute to the gradients"),
    "rows shown through embedding and head": (rows_shown_through_the_embedding, "did not contribute"),
    "work in a thread": (in_a_thread, "another thread"),
    "work in a raw _thread": (in_a_raw_thread, "other thread"),
    "memory meter switched off": (with_the_meter_off, "meter switched off"),
    "a forked child": (forks, "started other processes"),
    "a subprocess": (runs_a_process, "started other processes"),
    "no optimizer step": (no_update, "did not change the trainable weights"),
    "idle on the second call": (idle_on_one_call, "step 2 fed the model 0 tokens but skipped 2"),
    "half the rows from the second call on": (half_the_rows_on_one_call, "skipped 1 of the batch's 2 rows"),
    "forward only": (forward_only, "did not contribute to the gradients"),
    "blocks dropped": (drops_blocks, "decoder blocks or output layer were replaced or removed"),
    "step raises SystemExit": (exits, "step 1 raised SystemExit"),
}


@pytest.mark.parametrize("cheat", list(CHEATS))
def test_every_cheat_fails_with_its_sentence(tiny_course, cheat):
    step_of, words = CHEATS[cheat]
    result = run(lora(step_of), tiny_course)
    assert result.status == FAIL and result.points == 0 and words in result.message, result.message


def test_a_step_that_patches_the_referee_fails(tiny_course, monkeypatch):
    from helpers import memory

    monkeypatch.setattr(memory._Tracker, "__torch_dispatch__", memory._Tracker.__torch_dispatch__)  # undone after
    result = run(lora(patches_the_meter), tiny_course)
    assert result.status == FAIL and "changed the referee's own code (helpers.memory._Tracker" in result.message


def chunked(model, optimizer, honest):
    """The loss in chunks of positions (lesson 10): every row passes through the output layer in every chunk."""
    def step(batch):
        model.train()
        loss = causal_lm_loss(model, batch, chunk=8)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def flattened(model, optimizer, honest):
    """Chunks of flattened tokens skip the rows: the output layer never sees a row, so the referee cannot tell
    that each row was trained on, and says so."""
    def step(batch):
        model.train()
        hidden = model.get_decoder()(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
        targets = next_token_targets(batch["labels"]).flatten()
        head = model.get_output_embeddings()
        flat = hidden.flatten(0, 1)
        loss = sum(torch.nn.functional.cross_entropy(head(flat[i:i + 16]), targets[i:i + 16], ignore_index=-100,
                                                     reduction="sum") for i in range(0, len(flat), 16))
        (loss / (targets != -100).sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def test_a_chunked_loss_is_accepted_and_rows_flattened_away_are_not(tiny_course):
    assert run(lora(chunked), tiny_course).status == PASS
    result = run(lora(flattened), tiny_course)
    assert result.status == FAIL and "did not contribute to the gradients" in result.message, result.message


def test_a_lying_loss_is_not_believed_nor_called(tiny_course):
    assert run(lora(lying_loss), tiny_course).status == PASS  # the loss is only reported: never called


def test_a_model_in_shared_memory_is_refused(tiny_course):
    def shared():
        model, optimizer, step = lora()()
        for p in model.parameters():
            p.data.share_memory_()
        return model, optimizer, step
    result = run(shared, tiny_course)
    assert result.status == FAIL and "shared memory" in result.message


def test_a_thread_started_by_the_recipe_and_alive_during_steps_is_refused(tiny_course):
    stop = threading.Event()

    def with_a_worker():
        threading.Thread(target=stop.wait, daemon=True).start()
        return lora()()
    try:
        result = run(with_a_worker, tiny_course)
    finally:
        stop.set()
    assert result.status == FAIL and "other thread" in result.message


def test_trainable_tensors_that_never_get_a_gradient_or_never_move_do_not_count(tiny_course):
    result = run(lora(lr=0.0), tiny_course)  # nothing moves
    assert result.status == FAIL and "did not change the trainable weights" in result.message

    def with_an_unused_parameter():
        model, optimizer, step = lora()()
        model.register_parameter("unused", torch.nn.Parameter(torch.zeros(4)))  # trainable, never in the forward
        return model, optimizer, step
    result = run(with_an_unused_parameter, tiny_course)
    assert result.status == FAIL and "1 of the model's" in result.message and "e.g. unused" in result.message

    def forgotten_by_the_optimizer():
        model, optimizer, step = lora()()
        model.lm_head.weight.requires_grad_(True)  # tied: the embedding trains, but the optimizer does not know it
        return model, optimizer, step
    result = run(forgotten_by_the_optimizer, tiny_course)
    assert result.status == FAIL and "never changed" in result.message, result.message


class Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, **kwargs):
        return self.model(**kwargs)


class Triple(tuple):
    def __iter__(self):
        return iter((tiny_model(**TINY), None, lambda batch: 0.0))

    def __len__(self):
        return 3


def patched_forward():
    model, optimizer, step = lora()()
    model.base_model.model.lm_head.forward = lambda hidden: torch.zeros(1)  # an instance forward of one's own
    return model, optimizer, step


@pytest.mark.parametrize("setup,words", [
    (LoraConfig(r=8), "give the function itself"),
    (lambda: (None, None), "three things"),
    (lambda: Triple((1, 2)), "three things"),  # a tuple that says it holds three things
    (lambda: ("model", None, lambda b: 0.0), "torch.nn.Module"),
    (lambda: (tiny_model(), None, lambda b: 0.0), "not the course model"),
    (lambda: (Wrapper(tiny_model(**TINY)), None, lambda b: 0.0), "Wrapper of your own"),
    (patched_forward, "forward of your own"),
    (lambda: (tiny_model(**TINY), None, lambda b: 0.0), "must be the optimizer"),
    (lambda: (tiny_model(**TINY).requires_grad_(False), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1),
              lambda b: 0.0), "requires grad"),
    (lambda: 1 / 0, "your function raised ZeroDivisionError"),
    (lambda: sys.exit(3), "your function raised SystemExit"),
])
def test_malformed_and_lying_setups_get_a_sentence(tiny_course, setup, words):
    result = grade("fit_the_budget", setup, {"workload": JOB, "reference": tiny_ref(tiny_course)}) if not callable(
        setup) else run(setup, tiny_course)
    assert result.status == FAIL and result.points == 0 and words in result.message, result.message


def test_blank_is_not_attempted():
    for blank in BLANKS[:2]:
        for name in ("fit_the_budget", "fit_the_tight_budget", "fit_the_smallest_budget"):
            assert grade(name, blank, {"workload": JOB, "reference": tiny_ref(1.0)}).status == SKIP


def test_a_workload_needs_two_steps():
    with pytest.raises(ValueError, match="at least 2 steps"):
        Workload(optimizer_steps=1)


# ------------------------------------------------------------------------------------------------
# bitsandbytes' packed CPU layout (lesson 05's trap), on a tiny 4-bit model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-course")
    tiny_model(**TINY).save_pretrained(folder)
    return str(folder)


def qlora(folder):
    def setup():
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        model = prepare_model_for_kbit_training(load_model(folder, quantization_config=quantization),
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, optimizer, lambda batch: make_train_step(model, optimizer, batch, gradient_checkpointing=True,
                                                               gradient_accumulation_steps=2)()
    return setup


def evaluated_first(setup, reenable=False):
    """``setup``, with the model evaluated in eval mode without gradients before it is returned (the trap);
    ``reenable`` first switches bitsandbytes' packing back on, as a model from from_pretrained has it."""
    def build():
        model, optimizer, step = setup()
        if reenable:
            for layer in model.modules():
                if hasattr(layer, "support_avx512bf16_for_cpu"):  # every bitsandbytes Linear4bit
                    layer.support_avx512bf16_for_cpu = True
        model.eval()
        with torch.no_grad():
            model(input_ids=capstone.course_corpus().heldout[:1])
        return model, optimizer, step
    return build


def test_a_model_packed_before_the_first_step_is_refused_on_every_cpu(tiny_course, tiny_checkpoint, avx512bf16):
    result = run(evaluated_first(qlora(tiny_checkpoint), reenable=True), tiny_course)
    assert result.status == FAIL and "packed by bitsandbytes for fast CPU inference" in result.message, result.message
    assert "no backward" in result.message and "prevent_packing" in result.message


def test_evaluating_a_model_from_load_model_before_returning_it_is_harmless(tiny_course, tiny_checkpoint, avx512bf16):
    data = plain(probe_setup(evaluated_first(qlora(tiny_checkpoint)), JOB))
    assert data["problems"] == [] and len(data["steps"]) == JOB.optimizer_steps, data
    result = verdict("fit_the_budget", data, context={"workload": JOB, "reference": tiny_ref(data["ppl_start"])})
    assert result.status == PASS, result.message


@pytest.mark.filterwarnings("ignore:.*gemv_4bit.*autograd kernel")  # torch says so of the packed layer: the point
@pytest.mark.parametrize("trainer", ["make_train_step", "own loop"])
def test_layers_packed_during_the_run_are_refused(tiny_course, tiny_checkpoint, avx512bf16, trainer):
    def packs_in_its_first_step():
        model, optimizer, step = qlora(tiny_checkpoint)()
        done = []

        def own_loop(batch):  # what make_train_step does, without its refusal to train packed layers
            model.train()
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        def sneaky(batch):
            if not done:
                done.append(evaluated_first(lambda: (model, optimizer, step), reenable=True)())
            return (step if trainer == "make_train_step" else own_loop)(batch)
        return model, optimizer, sneaky
    result = run(packs_in_its_first_step, tiny_course)
    words = "were packed by bitsandbytes" if trainer == "make_train_step" else "packed for CPU inference during the run"
    assert result.status == FAIL and words in result.message, result.message


# ------------------------------------------------------------------------------------------------
# The real thing: a QLoRA setup on the course model, through the probe and the judge
# ------------------------------------------------------------------------------------------------
SMALL = Workload(batch_size=2, seq_len=128, optimizer_steps=2, eval_chunks=2, budget=500 * MiB, quality=1.5)


@pytest.mark.slow
def test_a_real_qlora_recipe_fits_learns_and_passes():
    # A notebook that altered the cached corpus (here: held-out chunks swapped for training ones) gains nothing.
    poisoned = capstone.course_corpus()
    poisoned.heldout_index = poisoned.train_index[:2]

    def setup():
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        model = prepare_model_for_kbit_training(load_model(quantization_config=quantization),
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return model, optimizer, lambda batch: make_train_step(model, optimizer, batch, gradient_checkpointing=True,
                                                               gradient_accumulation_steps=2)()
    data = plain(probe_setup(setup, SMALL))
    assert capstone.course_corpus() is not poisoned
    assert data.get("problems") == [] and len(data["steps"]) == 2, data
    steps = [capstone.step_peak(s) / MiB for s in data["steps"]]
    assert steps[0] <= steps[1] < 300  # the first step creates AdamW's moments at its end: it peaks lower
    reference = tiny_ref(capstone.pretrained_perplexity(SMALL.eval_chunks))  # SMALL's bar: 1.5 x the pretrained
    result = verdict("fit_the_budget", data, context={"workload": SMALL, "reference": reference})
    assert result.status == PASS and result.points == 3, result.message


def test_the_lesson_table_gets_each_checks_last_run_and_grading_never_reads_it(tiny_course):
    from helpers.exercises.lesson12 import measured

    run(lora(), tiny_course)
    shown = measured("fit_the_budget")
    assert shown is not None and shown.problems == [] and len(shown.reports) == JOB.optimizer_steps
    row = shown.tier_row()
    assert row["naive / peak (x)"] == pytest.approx(capstone.load_reference()["naive_peak"] / shown.peak)
    run(lambda: 1 / 0, tiny_course)  # a setup that cannot run leaves nothing to show
    assert measured("fit_the_budget") is None
    data = plain(probe_tight_setup(lora(), JOB))
    assert data["problems"] == [] and measured("fit_the_tight_budget").workload.budget == TIGHT_WORKLOAD.budget
    data = plain(probe_smallest_setup(lora(), JOB))
    assert data["problems"] == [] and measured("fit_the_smallest_budget").workload.budget == SMALLEST_WORKLOAD.budget
