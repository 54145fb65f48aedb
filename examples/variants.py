"""The pre-configured scales (1B ... 1T) with total and active parameter counts (meta device: no memory)."""

from open_mythos import count_parameters
from open_mythos.variants import VARIANTS

print(f"{'variant':<12}{'dim':>7}{'experts':>9}{'loops':>7}{'total':>10}{'active':>9}")
for name, make in VARIANTS.items():
    cfg = make()
    c = count_parameters(cfg)
    print(f"{name:<12}{cfg.dim:>7}{cfg.n_experts:>9}{cfg.max_loop_iters:>7}{c['total'] / 1e9:>9.2f}B"
          f"{c['active'] / 1e9:>8.2f}B")
