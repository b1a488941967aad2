"""Lesson 09's launches, for real, on the tiny model: two CPU ranks over gloo with torchrun and deepspeed.

Each rank's model states (measured by identity) must equal helpers.estimate's per-rank prediction, the
losses must match one process's, and a launch that goes wrong must fail fast with a sentence saying why.
"""

import socket
import time

import psutil
import pytest

from helpers.distributed.launch import RUNS, LaunchError, command, diagnose, launch, recipe_for, zero_model_states
from helpers.estimate import Recipe, model_states, predict
from helpers.models import tiny_config

TINY = ["--model", "tiny", "--seq-len", "16"]


def tiny_recipe(name: str) -> Recipe:
    return recipe_for(name, batch_size=1, seq_len=16)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    runs = launch("single", out=out / "single", extra=TINY, timeout=180)
    runs |= launch("ddp", out=out / "ddp", extra=TINY, timeout=180)
    runs |= launch("fsdp", out=out / "fsdp", extra=TINY, timeout=180)
    runs |= launch("zero1", "zero2", "zero3", "zero2_offload", out=out / "zero", extra=TINY, timeout=300)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero2_offload"])
def test_each_rank_holds_its_predicted_share(reports, name):
    ranks = reports[name]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["backend"] for r in ranks} == {"gloo"}
    predicted = model_states(tiny_config(), tiny_recipe(name))
    whole = model_states(tiny_config(), Recipe(batch_size=1, seq_len=16))["gradients"]
    for r in ranks:
        for category, measured in r["model_states"].items():
            if category == "gradients" and name in ("zero1", "zero2"):
                # DeepSpeed's reduced gradients are views into larger buffers (lesson 09): the storage a rank
                # keeps lies between its partition and every gradient.
                assert whole / 2 * 0.98 <= measured <= whole * 1.02, (name, r["rank"], measured)
            else:
                assert measured == pytest.approx(predicted[category], rel=0.01), (name, r["rank"], category)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", "ddp", "fsdp", "zero1", "zero2", "zero3", "zero2_offload"])
def test_the_largest_rank_peak_is_the_predicted_peak(reports, name):
    """The whole step's peak, with each engine's own buffers (helpers.estimate._shard), on the tiny model. The
    course model's cases (python -m helpers.tools.benchmark) agree to 0.02 %; on this 0.16 M-parameter model DeepSpeed's
    7.6 MiB bucket is most of the peak and smaller buffers the predictor does not model (coalesced all-gathers of
    small parameters, the flat copies around ZeRO-1/2's step) move it by up to 7 %: the issue's 10 % holds."""
    measured = max(sum(r["peak"].values()) for r in reports[name])
    predicted = predict(tiny_config(), tiny_recipe(name)).peak
    assert predicted == pytest.approx(measured, rel=0.10), (name, predicted, measured)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero2_offload"])
def test_losses_match_one_process(reports, name):
    single = reports["single"][0]["losses"]
    assert len(single) == 3 and single[0] != single[-1]  # it trained
    for r in reports[name]:
        assert r["losses"] == pytest.approx(single, rel=1e-4)


@pytest.mark.slow
def test_sharding_shrinks_what_the_formula_says(reports):
    """Stage by stage, the measured per-rank bytes move as the ZeRO formulas move (fp32: 4 + 4 + 12 bytes)."""
    params = reports["zero1"][0]["params"]
    for name in ("zero1", "zero2", "zero3"):
        formula = zero_model_states(params, RUNS[name].stage, 2, weight_bytes=4, grad_bytes=4, k=12)
        states = reports[name][1]["model_states"]
        for category in ("weights", "optimizer") if name != "zero3" else formula:
            assert states[category] == pytest.approx(formula[category], rel=0.01), (name, category)


def _workers_alive(out) -> list:
    alive = []
    for p in psutil.process_iter(["cmdline"]):
        if str(out) in " ".join(p.info["cmdline"] or []):
            alive.append(p)
    return alive


@pytest.mark.parametrize("name", ["fsdp", "zero2"])  # torchrun's failure table, deepspeed's "return code"
@pytest.mark.slow
def test_a_dead_rank_fails_fast_with_a_reason(tmp_path, name):
    t0 = time.perf_counter()
    with pytest.raises(LaunchError, match="A rank died") as err:
        launch(name, out=tmp_path, extra=[*TINY, "--die-at-rank", "1"], timeout=180)
    assert time.perf_counter() - t0 < 150
    assert str(tmp_path / "launch.log") in str(err.value)  # the message points at the full log ...
    assert "exiting on purpose" in (tmp_path / "launch.log").read_text()  # ... which holds the rank's own words
    assert not _workers_alive(tmp_path)


@pytest.mark.slow
def test_a_taken_port_fails_fast_with_a_reason(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(LaunchError, match="port is already in use"):
            launch("fsdp", out=tmp_path, port=s.getsockname()[1], extra=TINY, timeout=120)
    assert not _workers_alive(tmp_path)


@pytest.mark.slow
def test_a_run_over_its_time_limit_is_killed_whole(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(LaunchError, match="did not finish within 4 s"):
        launch("fsdp", out=tmp_path, extra=TINY, timeout=4)
    assert time.perf_counter() - t0 < 30
    assert not _workers_alive(tmp_path)


def test_a_missing_compiler_is_named():
    log = ("RuntimeError: Error building extension 'deepspeed_shm_comm'\n"
           "/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.")
    assert "C++ compiler" in diagnose(log, 1, False, 60)
    assert "C++ compiler" not in diagnose("Traceback ...\nValueError: bad batch", 1, False, 60)


def test_commands_are_the_real_launchers(tmp_path):
    assert command("ddp", tmp_path, 1234)[1:3] == ["launch", "--multi_gpu"]
    assert command("fsdp", tmp_path, 1234)[0].endswith("torchrun")
    zero = command(["zero1", "zero2"], tmp_path, 1234)
    assert zero[0].endswith("deepspeed") and "zero1,zero2" in zero
    with pytest.raises(ValueError, match="different launchers"):
        command(["ddp", "zero2"], tmp_path, 1234)
    with pytest.raises(ValueError, match="unknown run"):
        launch("zero4", out=tmp_path)


def test_deepspeed_without_a_compiler_is_refused_before_launching(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++ / g++ to be found
    t0 = time.perf_counter()
    with pytest.raises(LaunchError, match="C\\+\\+ compiler"):
        launch("zero2", out=tmp_path, extra=TINY, timeout=60)
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "launch.log").exists()


# --- what real multi-GPU runs add: FSDP2's policies, HSDP, DCP save/resume, DeepSpeed's buckets ----------------


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    runs = launch("fsdp", "fsdp_bf16", "fsdp_offload", "hsdp", "fsdp_save", out=out / "a", extra=TINY, timeout=300)
    runs |= launch("fsdp_resume", "fsdp_resume_weights", out=out / "b", timeout=300,
                   extra=[*TINY, "--checkpoint", str(out / "a" / "dcp")])
    return runs


@pytest.mark.slow
def test_mixed_precision_policy_keeps_fp32_model_states_and_shrinks_the_rest(fsdp2_runs):
    plain, bf16 = fsdp2_runs["fsdp"], fsdp2_runs["fsdp_bf16"]
    assert len(bf16[0]["losses"]) == RUNS["fsdp_bf16"].steps == 2  # the slow run's own step count
    for a, b in zip(plain, bf16, strict=True):
        assert b["model_states"] == a["model_states"]  # fp32 shards, fp32 gradient shards, fp32 moments
        assert b["placement"]["weights"] == ["cpu", "torch.float32"]
        assert b["peak"]["activations"] < 0.9 * a["peak"]["activations"]  # bf16 gathers and activations
        assert b["losses"] == pytest.approx(a["losses"][:2], rel=1e-2)
        assert b["losses"] != pytest.approx(a["losses"][:2], rel=1e-7)  # really computed in bf16


@pytest.mark.slow
def test_cpu_offload_policy_runs_and_changes_nothing_on_a_cpu(fsdp2_runs):
    for a, b in zip(fsdp2_runs["fsdp"], fsdp2_runs["fsdp_offload"], strict=True):
        assert b["model_states"] == a["model_states"]
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-6)
        assert b["placement"]["weights"][0] == "cpu" and b["offload"] is True


@pytest.mark.slow
def test_hsdp_two_replicas_of_one_shard_hold_full_copies(fsdp2_runs, reports):
    for r, ddp in zip(fsdp2_runs["hsdp"], reports["ddp"], strict=True):
        assert r["placement"]["weight_placements"] == ["R", "S(0)"] and r["mesh"] == [2, 1]
        for category in ("weights", "optimizer"):
            assert r["model_states"][category] == pytest.approx(ddp["model_states"][category], rel=0.01)
        assert r["losses"] == pytest.approx(reports["single"][0]["losses"], rel=1e-4)


@pytest.mark.slow
def test_dcp_resume_continues_exactly_and_each_rank_writes_its_shard(fsdp2_runs):
    saved, resumed, fresh = fsdp2_runs["fsdp_save"], fsdp2_runs["fsdp_resume"], fsdp2_runs["fsdp_resume_weights"]
    assert [r["first_step"] for r in resumed] == [1, 1]
    for r in resumed:
        assert r["losses"] == pytest.approx(saved[0]["losses"][1:], rel=1e-6)
        assert r["checkpoint"]["optimizer_steps"] == [1.0]
    # the model alone gives the right next loss, but not the one after the first update with fresh moments
    assert fresh[0]["losses"][0] == pytest.approx(saved[0]["losses"][1], rel=1e-6)
    assert fresh[0]["losses"][1] != pytest.approx(saved[0]["losses"][2], rel=1e-5)
    files = [r["checkpoint"]["files"] for r in saved]
    assert [sorted(f) for f in files] == [["__0_0.distcp"], ["__1_0.distcp"]]
    # each file holds about half of the weights (the tied embedding under both names) and of AdamW's moments
    params = saved[0]["params"]
    embedding = tiny_config().vocab_size * tiny_config().hidden_size
    half = ((params + embedding) * 4 + params * 8) / 2
    for f in files:
        (size,) = f.values()
        assert half * 0.95 <= size <= half * 1.3, (size, half)  # the tiny model's per-tensor overhead is large


def test_recipe_refuses_what_the_predictor_does_not_model():
    with pytest.raises(ValueError, match="does not model"):
        recipe_for("fsdp_bf16")
    with pytest.raises(ValueError, match="does not model"):
        recipe_for("hsdp")
    assert recipe_for("fsdp_save") == recipe_for("fsdp") == recipe_for("fsdp_offload")


def test_bucket_settings_reach_deepspeed_and_the_predictor(tmp_path):
    from helpers.distributed.worker import deepspeed_config

    spec = RUNS["zero2_buckets"]
    config = deepspeed_config(2, False, 1, **dict(spec.zero))
    assert config["zero_optimization"]["overlap_comm"] is True
    assert config["zero_optimization"]["reduce_bucket_size"] == 20_000_000
    assert config["zero_optimization"]["allgather_bucket_size"] == 20_000_000
    r = recipe_for("zero2_buckets")
    assert (r.overlap_comm, r.reduce_bucket_size) == (True, 20_000_000)
    base = predict(tiny_config(), recipe_for("zero2")).peak
    assert predict(tiny_config(), r).peak - base == 2 * 20_000_000 * 4 - 2_000_000 * 4


@pytest.mark.slow
def test_bucket_run_grows_the_bucket_rank_by_the_predicted_bytes(tmp_path, reports):
    runs = launch("zero2_buckets", out=tmp_path, extra=TINY, timeout=300)
    change = 2 * 20_000_000 * 4 - 2_000_000 * 4
    rank0 = sum(runs["zero2_buckets"][0]["peak"].values()) - sum(reports["zero2"][0]["peak"].values())
    assert rank0 == pytest.approx(change, rel=0.02)
    assert runs["zero2_buckets"][0]["losses"] == pytest.approx(reports["single"][0]["losses"], rel=1e-4)
