"""Profile one train step at the ~1B bench shape, MTP on vs off: top CUDA kernels (for issue 17's overhead)."""
import json, sys, tempfile, time
import torch
sys.argv = [sys.argv[0]]
sys.path.insert(0, "scripts")
import bench_train_step as b
from dataclasses import replace
from skyrl_mtp.models.checkpoint import random_hf_state_dict, save_hf_checkpoint
from skyrl_mtp.tools.check_policy_invariance import synthetic_batch
from skyrl_mtp.config.schema import MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.workers.config import PolicyWorkerConfig
from skyrl_mtp.workers.policy import MegatronPolicy

class A: hidden=2048; layers=16; heads=16; kv_heads=8; ffn=5632; vocab=151680; seq=4096
variant = sys.stdin.readline().strip() if False else None
import os
variant = os.environ["VARIANT"]
model = b.bench_model(A)
path = os.environ.get("CKPT") or (tempfile.mkdtemp() + "/m")
if not os.path.exists(path + "/config.json"):
    save_hf_checkpoint(model, random_hf_state_dict(model, 0), path)
base = PolicyWorkerConfig(model_path=path, optim=OptimConfig(lr=1e-5), mtp=MtpConfig(enabled=False),
                          megatron=MegatronConfig(micro_batch_size=1, params_dtype="bfloat16"))
cfg = base if variant == "off" else replace(base, mtp=MtpConfig(enabled=True, num_speculative_tokens=1, loss_type="soft_ce"))
policy = MegatronPolicy(cfg)
def batch(step):
    x = synthetic_batch(step, 30000, 4, 4096, 1024); x["old_logprobs"] = torch.zeros(4, 4096); return x
for s in range(3):
    policy.train_step(batch(s))
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    t = time.perf_counter(); policy.train_step(batch(5)); torch.cuda.synchronize(); dt = time.perf_counter() - t
print(f"VARIANT {variant} step {dt:.4f} s")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
