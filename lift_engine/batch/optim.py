"""AdamW over adapter banks that steps only the slots whose document is in the step.

torch.optim.AdamW over a bank [N, …] would update every slot at every step: a slot whose
document is not in the batch (zero gradient) would still get weight decay, a moment
update and an advanced step count, so a document trained in a mixed job would not match
the same document trained alone. SlotAdamW keeps per-slot step counts and updates only
the slots marked active, with torch.optim.AdamW's formula:

    p      ← p · (1 − lr·wd)
    m      ← lerp(m, g, 1 − β1)
    v      ← β2·v + (1 − β2)·g²
    p      ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)       t: the slot's own step count

The update runs in torch's fused AdamW kernel (`torch._fused_adamw_`, what
`torch.optim.AdamW(fused=True)` calls; CPU and CUDA) over one view per (bank, active
slot), each with its slot's step count: one pass over p, g, m and v instead of eight
elementwise ops per bank (measured 0.54 → 0.15 s per step for the 420 LoRA banks of
SmolLM2-135M at N = 16 on this CPU; on a GPU, a few launches instead of ~3400). It rounds
like the single-tensor formula to about one ulp. Where the kernel is missing (another
device, an older torch), or with `fused=False`, the single-tensor ops run per bank.

State of one slot (`slot_state(n)`) is what a per-document checkpoint stores.
`clip_per_slot` clips the gradients of each slot on its own, before the step.
"""
from __future__ import annotations

import torch


def fused_adamw_available(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters in one call (one device
    and one floating dtype, which the kernel supports there)."""
    if not params:
        return False
    param = params[0]
    if (not hasattr(torch, "_fused_adamw_") or not param.is_floating_point()
            or any(p.dtype != param.dtype or p.device != param.device for p in params)):
        return False
    try:
        probe = [torch.zeros(1, dtype=param.dtype, device=param.device)]
        torch._fused_adamw_(probe, [probe[0].clone()], [probe[0].clone()], [probe[0].clone()], [],
                            [torch.ones((), dtype=torch.float32, device=param.device)], lr=0.0, beta1=0.9, beta2=0.999,
                            weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def clip_per_slot(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to `max_norm` separately for every adapter slot (leading axis).

    params: bank parameters [N, …]. Returns the per-slot norms before clipping, [N].
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    sq = torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grads]).sum(dim=0)
    norms = sq.sqrt()
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.view(-1, *([1] * (g.dim() - 1))))
    return norms


class SlotAdamW:
    """params: bank parameters, each with the adapter axis first ([N, …]).

    fused: True / False forces the fused kernel on or off; None (default) uses it where
    `fused_adamw_available`."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 fused: bool | None = None):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("SlotAdamW needs at least one parameter")
        self.num_slots = int(self.params[0].shape[0])
        if any(int(p.shape[0]) != self.num_slots for p in self.params):
            raise ValueError("every bank parameter must have the same leading adapter axis")
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(betas), float(eps), float(weight_decay)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [0] * self.num_slots
        self.fused = fused_adamw_available(self.params) if fused is None else bool(fused)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, slots: list[int]) -> None:
        """One AdamW update of exactly the slots listed (each at most once)."""
        slots = sorted(set(int(s) for s in slots))
        if not slots:
            return
        for s in slots:
            self.steps[s] += 1
        (self._step_fused if self.fused else self._step_single_tensor)(slots)

    def _step_single_tensor(self, slots: list[int]) -> None:
        """The update of `step` for `slots` (step counts already advanced), torch's
        single-tensor formula per bank, gathering the slots unless all are active."""
        beta1, beta2 = self.betas
        device = self.params[0].device
        idx = torch.tensor(slots, dtype=torch.long, device=device)
        # Bias corrections in float64 Python arithmetic, as torch computes them.
        bc1 = [1 - beta1 ** self.steps[s] for s in slots]
        bc2_sqrt = [(1 - beta2 ** self.steps[s]) ** 0.5 for s in slots]
        for p, m_all, v_all in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                grad = p.new_zeros((len(slots),) + tuple(p.shape[1:]))
            elif len(slots) == self.num_slots:
                grad = p.grad
            else:
                grad = p.grad.index_select(0, idx)
            shape = (len(slots),) + (1,) * (p.dim() - 1)
            step_size = torch.tensor([self.lr / b for b in bc1], dtype=p.dtype, device=p.device).view(shape)
            bc2 = torch.tensor(bc2_sqrt, dtype=p.dtype, device=p.device).view(shape)
            every = len(slots) == self.num_slots  # the common case: update in place, no gather/scatter
            param = p.data if every else p.data.index_select(0, idx)
            m = m_all if every else m_all.index_select(0, idx)
            v = v_all if every else v_all.index_select(0, idx)
            if self.weight_decay:
                param.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / bc2).add_(self.eps)
            param.sub_(step_size * m / denom)
            if not every:
                p.data.index_copy_(0, idx, param)
                m_all.index_copy_(0, idx, m)
                v_all.index_copy_(0, idx, v)

    def _step_fused(self, slots: list[int]) -> None:
        """The update of `step` for `slots` (step counts already advanced), in one fused call."""
        beta1, beta2 = self.betas
        device = self.params[0].device
        counts = {s: torch.tensor(float(self.steps[s]), dtype=torch.float32, device=device) for s in slots}
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p, m_all, v_all in zip(self.params, self.exp_avg, self.exp_avg_sq):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            for views, whole in ((params, p.data), (grads, grad), (exp_avgs, m_all), (exp_avg_sqs, v_all)):
                per_slot = whole.unbind(0)
                views.extend(per_slot[s] for s in slots)
            steps.extend(counts[s] for s in slots)
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=self.lr, beta1=beta1, beta2=beta2,
                            weight_decay=self.weight_decay, eps=self.eps, amsgrad=False, maximize=False)

    # ------------------------------------------------------------ per-slot state
    @torch.no_grad()
    def reset_slot(self, n: int) -> None:
        for m, v in zip(self.exp_avg, self.exp_avg_sq):
            m[n].zero_()
            v[n].zero_()
        self.steps[n] = 0

    def slot_state(self, n: int) -> dict:
        return {
            "step": self.steps[n],
            "exp_avg": [m[n].detach().to("cpu", copy=True) for m in self.exp_avg],
            "exp_avg_sq": [v[n].detach().to("cpu", copy=True) for v in self.exp_avg_sq],
        }

    @torch.no_grad()
    def load_slot_state(self, n: int, state: dict) -> None:
        m_list, v_list = state["exp_avg"], state["exp_avg_sq"]
        if len(m_list) != len(self.exp_avg) or len(v_list) != len(self.exp_avg_sq):
            raise ValueError("optimizer state does not match the adapter banks")
        for m_all, v_all, m, v in zip(self.exp_avg, self.exp_avg_sq, m_list, v_list):
            if tuple(m.shape) != tuple(m_all.shape[1:]) or tuple(v.shape) != tuple(v_all.shape[1:]):
                raise ValueError("optimizer state has the wrong shape for this bank")
        for m_all, v_all, m, v in zip(self.exp_avg, self.exp_avg_sq, m_list, v_list):
            m_all[n].copy_(m)
            v_all[n].copy_(v)
        self.steps[n] = int(state["step"])
