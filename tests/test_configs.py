"""configs/: every cluster config loads with the library's own loader and does what its name and README say.

Nothing is launched and no GPU is needed. Each accelerate YAML goes through what ``accelerate launch`` itself
runs before it starts any process (``load_config_from_file``, ``_validate_launch_command``, ``prepare_*_env``)
down to torchrun's own ``LaunchConfig`` and to the FSDP / DeepSpeed plugin that the training script would build
from the environment the launcher sets. Each DeepSpeed JSON gets its ``"auto"`` values filled by the HF
Trainer's own code (``HfTrainerDeepSpeedConfig``) for 8 GPUs, then is parsed by DeepSpeed's own
``DeepSpeedConfig`` with a world size of 8 (its batch arithmetic and pydantic ZeRO schema). The last tests
show that the same loaders reject a broken file, so these tests can fail.
"""

from __future__ import annotations

import copy
import json
import os
import types
from pathlib import Path
from unittest import mock

import pytest
import yaml

from helpers.constants import ROOT

CONFIGS = ROOT / "configs"
ACCELERATE_DIR = CONFIGS / "accelerate"
DEEPSPEED_DIR = CONFIGS / "deepspeed"

# What each accelerate YAML must say: distributed type, total processes, machines, its DeepSpeed JSON (if any).
YAMLS = {
    "ddp_1node.yaml": ("MULTI_GPU", 8, 1, None),
    "fsdp_1node.yaml": ("FSDP", 8, 1, None),
    "fsdp_multinode.yaml": ("FSDP", 16, 2, None),
    "fsdp_hsdp_multinode.yaml": ("FSDP", 16, 2, None),
    "deepspeed_zero2_1node.yaml": ("DEEPSPEED", 8, 1, "zero2.json"),
    "deepspeed_zero3_1node.yaml": ("DEEPSPEED", 8, 1, "zero3.json"),
    "deepspeed_zero3_offload_1node.yaml": ("DEEPSPEED", 8, 1, "zero3_offload.json"),
    "deepspeed_multinode.yaml": ("DEEPSPEED", 16, 2, "zero3.json"),
}
# What each DeepSpeed JSON must say: ZeRO stage, optimizer offload device, parameter offload device.
JSONS = {
    "zero2.json": (2, None, None),
    "zero2_offload.json": (2, "cpu", None),
    "zero3.json": (3, None, None),
    "zero3_offload.json": (3, "cpu", "cpu"),
}
MULTINODE = [name for name, (_, _, machines, _) in YAMLS.items() if machines > 1]
GPUS, MICRO_BATCH, ACCUMULATION = 8, 4, 2  # the cluster the JSON tests pretend to run on


@pytest.fixture
def at_repo_root(monkeypatch):
    """The YAMLs name their JSON relative to the repo root, where learners launch; launch code writes os.environ."""
    monkeypatch.chdir(ROOT)
    with mock.patch.dict(os.environ):  # restored on exit, whatever accelerate / torchrun / the plugins set
        yield


def load(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


def unknown_nested_keys(cluster_config) -> list[str]:
    """Keys under fsdp_config / deepspeed_config that ``accelerate launch`` has no flag for.

    The loader only checks top-level keys; nested ones are copied onto the launch arguments by name
    (fsdp keys get an ``fsdp_`` prefix when they lack it), so a typo there is silently ignored.
    """
    from accelerate.commands.launch import launch_command_parser

    flags = {action.dest for action in launch_command_parser()._actions}
    keys = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in cluster_config.fsdp_config]
    keys += list(cluster_config.deepspeed_config)
    keys += list(cluster_config.parallelism_config)  # copied by name too (HSDP's mesh sizes)
    return sorted(k for k in keys if k not in flags)


def simulate_launch(config: Path | str, *flags: str):
    """Do what ``accelerate launch --config_file CONFIG [flags] train.py`` does, short of starting processes.

    Returns the launch arguments, the loaded config, the environment every rank would get, and torchrun's
    LaunchConfig (nodes, processes per node, rendezvous) as torchrun itself parses it.
    """
    import torch.distributed.run as distrib_run
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import launch as launch_utils

    args = launch_command_parser().parse_args(["--config_file", str(config), *flags, "train.py"])
    args, defaults, precision_from_config = _validate_launch_command(args)
    with mock.patch.object(launch_utils, "is_port_in_use", return_value=False):  # port 29500 busy here: no matter
        if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does before deepspeed_launcher
            fields = list(defaults.deepspeed_config) + (["mixed_precision"] if precision_from_config else [])
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
            cmd, env = launch_utils.prepare_deepspeed_cmd_env(args)
            assert cmd is None, f"{config} would start the pdsh launcher over ssh: {cmd}"
        else:
            env = launch_utils.prepare_multi_gpu_env(args)
    script = ["--training_script", args.training_script, "--training_script_args", args.training_script_args]
    torchrun_args = launch_utils._filter_args(args, distrib_run.get_args_parser(), script)
    launch_config, _, _ = distrib_run.config_from_args(torchrun_args)
    return args, defaults, env, launch_config


def plugin_in(env: dict):
    """The plugin ``Accelerator()`` / ``Trainer`` builds in every rank from the launcher's environment."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    with mock.patch.dict(os.environ, env):
        if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
            return DeepSpeedPlugin()
        if env.get("ACCELERATE_USE_FSDP") == "true":
            return FullyShardedDataParallelPlugin()
    return None


def trainer_filled(path: Path, *, bf16=True, fp16=False) -> dict:
    """The JSON with every "auto" filled the way the HF Trainer fills it for GPUS x MICRO_BATCH x ACCUMULATION."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    args = types.SimpleNamespace(  # the TrainingArguments attributes that trainer_config_process/finalize read
        world_size=GPUS, per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=ACCUMULATION,
        max_grad_norm=1.0, learning_rate=2e-5, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        weight_decay=0.0, save_on_each_node=False, fp16=fp16, fp16_full_eval=False, bf16=bf16,
        bf16_full_eval=False, get_warmup_steps=lambda steps: 0,
    )
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=576))  # SmolLM2-135M's width
    hf_config = HfTrainerDeepSpeedConfig(str(path))
    hf_config.trainer_config_process(args)
    hf_config.trainer_config_finalize(args, model, num_training_steps=100)
    unset_hf_deepspeed_config()  # or later tests' from_pretrained would believe ZeRO-3 is on
    assert not hf_config.mismatches
    return hf_config.config


def deepspeed_parse(config: dict, world_size: int = GPUS):
    """deepspeed.runtime.config.DeepSpeedConfig as each rank builds it, with the world size of a real cluster."""
    import deepspeed.runtime.config as ds_config

    with (
        mock.patch.object(ds_config.dist, "get_world_size", return_value=world_size),
        mock.patch.object(ds_config.dist, "get_rank", return_value=0),
    ):
        return ds_config.DeepSpeedConfig(copy.deepcopy(config))


def autos(node, prefix="") -> list[str]:
    if isinstance(node, dict):
        return [key for k, v in node.items() for key in autos(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


# --- the inventory ------------------------------------------------------------------------------------------


def test_every_file_has_expectations_and_a_readme_entry():
    assert sorted(p.name for p in ACCELERATE_DIR.iterdir()) == sorted(YAMLS)
    assert sorted(p.name for p in DEEPSPEED_DIR.glob("*.json")) == sorted(JSONS)
    readme = (CONFIGS / "README.md").read_text(encoding="utf-8")
    for name in [*YAMLS, *JSONS, "hostfile"]:
        assert name in readme, f"configs/README.md does not describe {name}"


# --- accelerate YAMLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_loads_with_accelerates_loader(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    distributed_type, processes, machines, json_name = YAMLS[name]
    config = load(ACCELERATE_DIR / name)
    assert isinstance(config, ClusterConfig)
    assert config.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert config.distributed_type == DistributedType(distributed_type)
    assert (config.num_processes, config.num_machines, config.machine_rank) == (processes, machines, 0)
    assert config.use_cpu is False
    assert unknown_nested_keys(config) == []
    if json_name is None:
        assert config.mixed_precision == "bf16"
        return
    # With a DeepSpeed JSON, precision belongs to the JSON: accelerate refuses mixed_precision in the YAML.
    assert config.mixed_precision is None
    path = config.deepspeed_config["deepspeed_config_file"]
    assert not Path(path).is_absolute() and path == f"configs/deepspeed/{json_name}"
    assert (ROOT / path).is_file()


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_launches_as_its_name_says(name, at_repo_root):
    distributed_type, processes, machines, json_name = YAMLS[name]
    args, _, env, launch = simulate_launch(f"configs/accelerate/{name}")
    assert (launch.min_nodes, launch.max_nodes) == (machines, machines)
    assert launch.nproc_per_node == processes // machines == 8
    plugin = plugin_in(env)
    if distributed_type == "MULTI_GPU":
        assert args.multi_gpu and plugin is None
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    elif distributed_type == "FSDP":
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
        assert plugin.fsdp_version == 2
        assert plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
        assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
        assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
        assert plugin.cpu_ram_efficient_loading is True
        # the class name must exist in transformers (read, not imported: importing the model code is slow)
        import transformers.models.llama as llama

        source = (Path(llama.__file__).parent / "modeling_llama.py").read_text(encoding="utf-8")
        assert "class LlamaDecoderLayer(" in source
    else:
        stage, optimizer_device, param_device = JSONS[json_name]
        assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == f"configs/deepspeed/{json_name}"
        assert plugin.zero_stage == stage
        assert plugin.offload_optimizer_device == (optimizer_device or "none")
        assert plugin.offload_param_device == (param_device or "none")
        assert plugin.zero3_init_flag is (stage == 3)


@pytest.mark.parametrize("name", MULTINODE)
def test_second_node_only_needs_machine_rank(name, at_repo_root):
    config = load(ACCELERATE_DIR / name)
    for rank in (0, 1):
        args, _, _, launch = simulate_launch(f"configs/accelerate/{name}", "--machine_rank", str(rank))
        assert launch.rdzv_configs["rank"] == rank
        assert launch.rdzv_endpoint == f"{config.main_process_ip}:{config.main_process_port}"
        assert (launch.min_nodes, launch.nproc_per_node) == (2, 8)
    # the SLURM recipe in configs/README.md passes the address on the command line instead
    _, _, _, launch = simulate_launch(f"configs/accelerate/{name}", "--main_process_ip", "10.1.2.3")
    assert launch.rdzv_endpoint == f"10.1.2.3:{config.main_process_port}"


def test_hostfile_parses_with_deepspeeds_reader_and_matches_the_multinode_configs():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(DEEPSPEED_DIR / "hostfile"))
    assert len(pool) == 2
    for name in MULTINODE:
        config = load(ACCELERATE_DIR / name)
        assert sum(pool.values()) == config.num_processes and len(pool) == config.num_machines


# --- DeepSpeed JSONs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", JSONS)
def test_json_is_valid_deepspeed_once_the_trainer_fills_auto(name):
    import deepspeed.runtime.constants as ds_constants
    import deepspeed.runtime.zero.config as ds_zero

    stage, optimizer_device, param_device = JSONS[name]
    raw = json.loads((DEEPSPEED_DIR / name).read_text(encoding="utf-8"))
    # DeepSpeedConfig ignores unknown top-level keys, so check them against DeepSpeed's own key names.
    vocabulary = {
        v for module in (ds_constants, ds_zero) for k, v in vars(module).items() if k.isupper() and isinstance(v, str)
    }
    assert set(raw) <= vocabulary, set(raw) - vocabulary
    assert raw["train_micro_batch_size_per_gpu"] == "auto" and raw["bf16"]["enabled"] == "auto"
    if stage < 3:  # DeepSpeed accepts offload_param at stage 2 and silently does nothing with it
        assert "offload_param" not in raw["zero_optimization"]

    for bf16 in (True, False):  # the same file serves bf16 GPUs (A100/H100) and fp16 ones (V100/T4)
        filled = trainer_filled(DEEPSPEED_DIR / name, bf16=bf16, fp16=not bf16)
        # DeepSpeed silently drops "auto" under zero_optimization, so make sure the Trainer filled them all
        assert autos(filled) == []
        ds = deepspeed_parse(filled)
        assert ds.world_size == GPUS
        assert ds.train_batch_size == GPUS * MICRO_BATCH * ACCUMULATION
        assert ds.gradient_accumulation_steps == ACCUMULATION
        assert (ds.bfloat16_config.enabled, ds.float16_config.enabled) == (bf16, not bf16)
        assert ds.zero_optimization_stage == stage
        zero = ds.zero_config
        for offload, device in ((zero.offload_optimizer, optimizer_device), (zero.offload_param, param_device)):
            if device is None:
                assert offload is None or offload.device == "none"
            else:
                assert offload.device == device and offload.pin_memory is True
        if stage == 3:
            assert zero.gather_16bit_weights_on_model_save is True  # save_model() writes a usable 16-bit model
            assert zero.prefetch_bucket_size == int(0.9 * 576 * 576)  # filled from hidden_size


@pytest.mark.parametrize("name", JSONS)
def test_accelerate_fills_precision_from_the_accelerator(name, at_repo_root):
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=f"configs/deepspeed/{name}")
    plugin.set_mixed_precision("bf16")  # what Accelerator(mixed_precision="bf16") does
    assert plugin.deepspeed_config["bf16"]["enabled"] is True and plugin.deepspeed_config["fp16"]["enabled"] is False
    assert plugin.zero_stage == JSONS[name][0]


# --- the same loaders reject broken files -------------------------------------------------------------------


@pytest.mark.parametrize(
    "zero_change",
    [{"stage": 5}, {"offload_optimiser": {"device": "cpu"}}, {"offload_param": {"device": "gpu"}}],
    ids=["stage-5", "typo-offload_optimiser", "offload-to-gpu"],
)
def test_deepspeed_rejects_a_broken_zero_section(zero_change):
    from pydantic import ValidationError

    config = trainer_filled(DEEPSPEED_DIR / "zero3.json")
    deepspeed_parse(config)  # the unbroken file passes
    config["zero_optimization"].update(zero_change)
    with pytest.raises(ValidationError):
        deepspeed_parse(config)


def test_deepspeed_rejects_a_batch_size_made_for_another_world_size():
    config = trainer_filled(DEEPSPEED_DIR / "zero2.json")  # train_batch_size computed for 8 GPUs
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        deepspeed_parse(config, world_size=4)


def test_accelerate_rejects_an_unknown_top_level_key(tmp_path):
    config = yaml.safe_load((ACCELERATE_DIR / "ddp_1node.yaml").read_text(encoding="utf-8"))
    config["num_gpus"] = 8
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown keys"):
        load(tmp_path / "bad.yaml")


def test_accelerate_rejects_mixed_precision_next_to_a_deepspeed_json(tmp_path, at_repo_root):
    # on the command line it is fine: it only fills the JSON's "auto"
    _, _, env, _ = simulate_launch("configs/accelerate/deepspeed_zero3_1node.yaml", "--mixed_precision", "fp16")
    assert env["ACCELERATE_MIXED_PRECISION"] == "fp16" and plugin_in(env).zero_stage == 3
    # in the YAML it is refused
    config = yaml.safe_load((ACCELERATE_DIR / "deepspeed_zero3_1node.yaml").read_text(encoding="utf-8"))
    config["mixed_precision"] = "bf16"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    _, _, env, _ = simulate_launch(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="deepspeed_config_file"):
        plugin_in(env)


def test_a_typo_under_fsdp_config_is_silently_ignored_by_accelerate_but_not_here(tmp_path, at_repo_root):
    config = yaml.safe_load((ACCELERATE_DIR / "fsdp_1node.yaml").read_text(encoding="utf-8"))
    config["fsdp_config"]["fsdp_transformer_layer_cls_to_warp"] = config["fsdp_config"].pop(
        "fsdp_transformer_layer_cls_to_wrap"
    )
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    loaded = load(tmp_path / "typo.yaml")  # accelerate's loader accepts it...
    _, _, env, _ = simulate_launch(tmp_path / "typo.yaml")
    assert plugin_in(env).transformer_cls_names_to_wrap is None  # ...and the wrap class is silently lost
    assert unknown_nested_keys(loaded) == ["fsdp_transformer_layer_cls_to_warp"]


# --- HSDP: FSDP2 on a 2-D mesh of replicas x shards ---------------------------------------------------------


def parallelism_in(env: dict):
    """The ``ParallelismConfig`` every rank's ``Accelerator()`` builds from the launcher's environment."""
    from accelerate.parallelism_config import ParallelismConfig

    assert env.get("ACCELERATE_USE_PARALLELISM_CONFIG") == "true"
    with mock.patch.dict(os.environ, env):
        return ParallelismConfig()


def accelerator_stub(processes: int):
    """What ``ParallelismConfig._validate_accelerator`` reads of an FSDP2 ``Accelerator`` with ``processes`` ranks."""
    from accelerate.utils import DistributedType

    return types.SimpleNamespace(multi_device=True, num_processes=processes, is_fsdp2=True, is_main_process=True,
                                 distributed_type=DistributedType.FSDP)


def test_hsdp_shards_inside_a_node_and_replicates_across_nodes(at_repo_root):
    args, config, env, launch = simulate_launch("configs/accelerate/fsdp_hsdp_multinode.yaml")
    parallel = parallelism_in(env)
    # the mesh FSDP2 gets: (replicas, shards), replicas = machines, shards = the GPUs of one machine
    assert parallel._get_mesh() == (("dp_replicate", "dp_shard"), (2, 8))
    assert (parallel.dp_replicate_size, parallel.dp_shard_size) == (launch.min_nodes, launch.nproc_per_node)
    assert parallel.fsdp_dim_names == ["dp_replicate", "dp_shard_cp"]  # fully_shard's 2-D mesh: HSDP
    parallel._validate_accelerator(accelerator_stub(config.num_processes))  # 2 x 8 = the 16 processes
    assert plugin_in(env).fsdp_version == 2 and plugin_in(env).reshard_after_forward is True
    # the plain multi-node FSDP file has no mesh: one 16-way shard across both machines
    _, _, flat_env, _ = simulate_launch("configs/accelerate/fsdp_multinode.yaml")
    assert "ACCELERATE_USE_PARALLELISM_CONFIG" not in flat_env


def test_hsdp_sizes_that_do_not_multiply_to_the_processes_are_refused(tmp_path, at_repo_root):
    config = yaml.safe_load((ACCELERATE_DIR / "fsdp_hsdp_multinode.yaml").read_text(encoding="utf-8"))
    config["parallelism_config"]["parallelism_config_dp_shard_size"] = 4  # 2 x 4 = 8, not 16
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    _, _, env, _ = simulate_launch(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="does not match num_processes"):
        parallelism_in(env)._validate_accelerator(accelerator_stub(16))


def test_accelerates_bf16_fsdp2_policy_reduces_gradients_in_bf16(at_repo_root):
    """``mixed_precision: bf16`` gives FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)``; for fp32
    gradient reduction (lesson 09's policy) pass the plugin a policy with ``reduce_dtype=torch.float32``."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    _, _, env, _ = simulate_launch("configs/accelerate/fsdp_hsdp_multinode.yaml")
    plugin = plugin_in(env)
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])  # what AcceleratorState does with it
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin(mixed_precision_policy={
            "param_dtype": torch.bfloat16, "reduce_dtype": torch.float32, "output_dtype": torch.bfloat16})
    assert plugin.mixed_precision_policy.reduce_dtype == torch.float32
