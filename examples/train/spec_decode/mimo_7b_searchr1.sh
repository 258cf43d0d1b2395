#!/usr/bin/env bash
# Search-R1 on MiMo-7B-RL: GRPO with a search tool (multi-turn: <search>query</search> ->
# <information>top-3 passages</information> -> ... -> <answer>text</answer>), MTP drafting k=3.
#   MODEL=/ckpt/MiMo-7B-RL (or the hub id XiaomiMiMo/MiMo-7B-RL)
#   TRAIN=/data/searchr1_train.jsonl EVAL=/data/searchr1_test.jsonl  ({"prompt", "answer"} per line:
#     Search-R1's NQ + HotpotQA question with its instruction prefix, and one golden answer)
#   RETRIEVER=http://10.0.0.5:8000  a retrieval server over the wiki corpus, started beforehand:
#     python -m skyrl_mtp.envs.retrieval --corpus wiki-18.jsonl --host 0.0.0.0 --port 8000
#     (BM25; Search-R1's e5 dense retriever is not provided here)
# Sized for one 8-GPU node: TP=2 x DP=4 policy, 4 vLLM engines; join a Ray cluster with ray.address=auto.
# Not run in this repository's CI (no GPU there); CI checks that this configuration composes.
set -euo pipefail
cd "$(dirname "$0")/../../.."
MODEL=${MODEL:-XiaomiMiMo/MiMo-7B-RL}
exec "${PYTHON:-python}" -m skyrl_mtp.train algorithm=grpo model=mimo_7b data=dapo_math generator=gpu megatron=gpu \
  model.path="$MODEL" data.name=jsonl data.train_path="${TRAIN:-/data/searchr1_train.jsonl}" \
  data.eval_path="${EVAL:-/data/searchr1_test.jsonl}" data.reward=search_exact data.apply_chat_template=true \
  data.max_prompt_length=512 env.name=search env.retrieval_url="${RETRIEVER:-http://127.0.0.1:8000}" \
  env.max_turns=4 env.topk=3 env.timeout_s=10 \
  trainer.mtp.enabled=true trainer.mtp.num_speculative_tokens=3 trainer.mtp.loss_type=tv trainer.mtp.optim.lr=1e-4 \
  generator.draft_sample_method=probabilistic \
  trainer.total_steps=1000 trainer.train_batch_size=256 trainer.n_samples_per_prompt=5 trainer.optim.lr=1e-6 \
  trainer.ppo_mini_batch_size=64 trainer.warm_start.enabled=false trainer.save_every=50 trainer.eval_every=50 \
  algorithm.kl_coef=0.001 generator.num_engines=4 generator.tensor_parallel_size=2 \
  generator.max_response_length=4096 generator.max_model_len=4608 \
  megatron.tp_size=2 megatron.dp_size=4 megatron.micro_batch_size=2 megatron.mtp_loss_chunk_size=1024 \
  trainer.run_dir=runs/mimo_7b_searchr1 trainer.experiment_name=mimo_7b_searchr1 "$@"
