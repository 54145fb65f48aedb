"""Build a small looped model, run it at several loop counts, generate, save and load (no pickle)."""

import tempfile

import torch

from open_mythos import MythosConfig, OpenMythos

torch.manual_seed(0)
cfg = MythosConfig(vocab_size=1000, dim=128, n_heads=4, n_kv_heads=2, max_seq_len=128, max_loop_iters=4,
                   prelude_layers=1, coda_layers=1, n_experts=8, n_shared_experts=1, n_experts_per_tok=2,
                   expert_dim=64, attn_type="mla", kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16,
                   qk_nope_head_dim=32, v_head_dim=32, lora_rank=4)
model = OpenMythos(cfg).eval()
ids = torch.randint(0, cfg.vocab_size, (2, 16))
with torch.no_grad():
    for n_loops in (1, 4, 8):  # 8 > max_loop_iters: depth extrapolation is defined
        logits, depth = model(ids, n_loops, return_act_depth=True)
        print(f"n_loops={n_loops}: logits {tuple(logits.shape)}, mean ACT depth {depth.mean():.2f}")
print(f"rho(A) = {model.recurrent.injection.spectral_radius():.4f} < 1")
out = model.generate(ids, max_new_tokens=8, n_loops=4, temperature=0.8, top_k=50, seed=0)
print("generated ids:", out[0, 16:].tolist())
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    again = OpenMythos.from_pretrained(d)
    assert torch.equal(again(ids, 4), model(ids, 4))
    print("save_pretrained / from_pretrained: identical logits")
