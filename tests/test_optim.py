"""SparseAdamW: torch's AdamW on dense gradients, lazy rows on sparse ones, and moments
only for the rows that ever had a gradient."""

from __future__ import annotations

import io

import torch

from flix.optim import SparseAdamW

SETTINGS = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _grads(steps: int, shape, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def test_dense_gradients_equal_torch_adamw():
    start = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    ours, ref = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt_ours, opt_ref = SparseAdamW([ours], **SETTINGS), torch.optim.AdamW([ref], **SETTINGS)
    for grad in _grads(5, start.shape):
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_ref.step()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_sparse_rows_train_like_adamw_and_others_stay_untouched():
    """A bank of 50 rows whose batches touch rows 3, 7 and 41: those rows follow torch's
    AdamW on them alone, every other row is bit-identical, and the optimizer holds moments
    for 3 rows, not 50."""
    start = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    bank = start.clone().requires_grad_()
    touched = torch.tensor([3, 7, 41])
    ref = start[touched].clone().requires_grad_()
    opt, opt_ref = SparseAdamW([bank], **SETTINGS), torch.optim.AdamW([ref], **SETTINGS)
    for grad in _grads(4, (3, 4)):
        # uncoalesced on purpose: row 7 appears twice, as two examples sharing a feature
        indices = torch.cat([touched, touched[1:2]]).unsqueeze(0)
        values = torch.cat([grad, torch.zeros(1, 4)])
        bank.grad = torch.sparse_coo_tensor(indices, values, bank.shape, check_invariants=False)
        ref.grad = grad.clone()
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(bank.detach()[touched], ref.detach(), rtol=0, atol=1e-6)
    others = torch.ones(50, dtype=torch.bool)
    others[touched] = False
    assert torch.equal(bank.detach()[others], start[others])
    state = opt.state[bank]
    assert int((state["slot"] >= 0).sum()) == 3 and len(state["exp_avg"]) < 50


def test_new_rows_later_and_state_dict_resume():
    """Rows first touched at a later step start from zero moments; a state_dict saved
    mid-way resumes to exactly the same weights as an uninterrupted run."""

    def run(split: int | None):
        bank = torch.zeros(20, 3).requires_grad_()
        opt = SparseAdamW([bank], **SETTINGS)
        gen = torch.Generator().manual_seed(5)
        for step in range(6):
            rows = torch.randint(20, (4,), generator=gen)
            bank.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), torch.randn(4, 3, generator=gen), bank.shape, check_invariants=False)
            opt.step()
            if step == split:
                buffer = io.BytesIO()
                torch.save({"bank": bank.detach().clone(), "opt": opt.state_dict()}, buffer)
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                bank = saved["bank"].requires_grad_()
                opt = SparseAdamW([bank], **SETTINGS)
                opt.load_state_dict(saved["opt"])
        return bank.detach()

    torch.testing.assert_close(run(None), run(2), rtol=0, atol=0)
