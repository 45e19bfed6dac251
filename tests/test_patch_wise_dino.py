"""Patch-Wise DINO loss and training step, held against independent computations.

- With [CLS]-only matches the loss, the updated center and the weights after one optimiser step equal a
  plain re-implementation of DINO's training step (several batch sizes, crop counts, temperatures, the
  teacher-temperature warm-up).
- With patch matches the loss and its gradient, chunked or not, equal a direct per-image, per-pair loop and
  the code's own reference_loss.
- Matched tokens move the loss; unmatched tokens and padding do not.
- The learning-rate schedule is DINO's cosine with linear warm-up.
"""
import argparse
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import patch_matching
import patch_wise_dino as pwd
import transforms
import utils
import vision_transformer as vits
from eval_testdata import REPO, run_script
from vision_transformer import DINOHead, VisionTransformer

STUDENT_TEMP = 0.1


# ----------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------
def dino_reference_loss(student_views, teacher_views, center, teacher_temp):
    """DINO's loss: mean over (teacher global iq, student view v != iq) of the batch-mean cross-entropy."""
    total, terms = 0.0, 0
    for iq, t in enumerate(teacher_views):
        q = torch.softmax((t - center) / teacher_temp, dim=-1)
        for v, s in enumerate(student_views):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s / STUDENT_TEMP, dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def loop_reference_loss(student_views, teacher, center, matches, teacher_temp):
    """Per view pair, per image, per matched token: the definition of the patch-wise loss (mean over an image's
    matched tokens, then over the images, then over the view pairs).

    ``student_views[v]`` (B, T_v, K); ``teacher`` (2B, T, K); ``center`` (1, T, K);
    ``matches[b]`` a list of (i, v, idx_t, idx_s)."""
    B = len(matches)
    num_pairs = len(matches[0])
    total = 0.0
    for p in range(num_pairs):
        pair_total = 0.0
        for b in range(B):
            i, v, idx_t, idx_s = matches[b][p]
            image_sum = 0.0
            for tt, ss in zip(idx_t.tolist(), idx_s.tolist()):
                q = torch.softmax((teacher[i * B + b, tt] - center[0, tt]) / teacher_temp, dim=-1)
                image_sum = image_sum + torch.sum(-q * F.log_softmax(student_views[v][b, ss] / STUDENT_TEMP, dim=-1))
            pair_total = pair_total + image_sum / len(idx_t)
        total = total + pair_total / B
    return total / num_pairs


def authors_loss(student_views, teacher, center, shared_matches, teacher_temp):
    """The authors' DINOLoss.forward with one match list per view pair shared by the batch, transcribed:
    softmax of the centred teacher over every token, the selected tokens of both views, the cross-entropy
    summed over K and averaged over (images, tokens), summed over pairs and divided by their number.

    ``student_views[v]`` (B, T_v, K); ``teacher`` (2B, T, K); ``shared_matches[(i, v)] = (idx_t, idx_s)``."""
    teacher_views = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(2)  # 2 x (B, T, K)
    total, terms = 0.0, 0
    for (i, v), (idx_t, idx_s) in shared_matches.items():
        q = teacher_views[i][:, idx_t.tolist(), :]  # (B, M, K)
        log_p = F.log_softmax(student_views[v][:, idx_s.tolist(), :] / STUDENT_TEMP, dim=-1)  # (B, M, K)
        total = total + torch.sum(-q * log_p, dim=-1).mean()
        terms += 1
    return total / terms


def random_matches(rng, num_views, grids, B):
    """Per image, the (i, v, idx_t, idx_s) of every view pair: [CLS] first, then a random number (0 included)
    of distinct random patch pairs, so images have different numbers of matches."""
    matches = []
    for _ in range(B):
        item = []
        for i in range(2):
            for v in range(num_views):
                if v == i:
                    continue
                n = int(rng.integers(0, min(grids[i], grids[v]) ** 2 + 1))
                idx_t = 1 + rng.choice(grids[i] ** 2, n, replace=False)
                idx_s = 1 + rng.choice(grids[v] ** 2, n, replace=False)
                item.append((i, v, np.concatenate([[0], idx_t]).astype(np.int64),
                             np.concatenate([[0], idx_s]).astype(np.int64)))
        matches.append(item)
    return matches


def gather_student(student_views, plan):
    """The student logits at ``plan.student_rows`` (MultiCropWrapper's flat layout)."""
    flat = torch.cat([s.flatten(0, 1) for s in student_views])  # (sum_v B*T_v, K)
    return flat[plan.student_rows]  # (S, K)


def make_loss(K, T, teacher_temp, center, chunk_elements=None, warmup_temp=None, warmup_epochs=0):
    loss = pwd.PatchWiseDINOLoss(K, T, warmup_temp or teacher_temp, teacher_temp, warmup_epochs, nepochs=10,
                                 chunk_elements=chunk_elements)
    loss.center.copy_(center)
    return loss


# ----------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,n_local,teacher_temp,K,warmup", [
    (1, 0, 0.04, 32, None), (3, 2, 0.07, 64, None), (5, 6, 0.04, 17, None),
    (2, 1, 0.04, 16, (0.07, 3, 0.055)),  # warm-up from 0.07 over 3 epochs: epoch 1 is linspace(.07, .04, 3)[1]
])
def test_cls_only_loss_center_and_gradient_equal_dino(B, n_local, teacher_temp, K, warmup):
    """``warmup``: (the teacher temperature at epoch 0, the warm-up epochs, the temperature at epoch 1)."""
    torch.manual_seed(B)
    V = 2 + n_local
    student_views = [torch.randn(B, K, dtype=torch.float64).float() * 3 for _ in range(V)]
    teacher_views = [torch.randn(B, K) * 0.1 for _ in range(2)]  # teacher_temp-sized: a soft teacher
    center = torch.randn(1, 1, K) * 0.05
    batch = pwd.collate_multicrop([([torch.zeros(3, 4, 4)] * V, patch_matching.cls_only_matches(V))] * B)
    plan = pwd.make_loss_plan(*batch[1:], view_tokens=[1] * V, teacher_tokens=1)
    assert torch.equal(plan.student_rows, torch.arange(V * B))  # [CLS] of every view, view by view

    leaves = [s.clone().requires_grad_() for s in student_views]
    warmup_temp, warmup_epochs, temp_now = warmup or (None, 0, teacher_temp)
    loss_fn = make_loss(K, 1, teacher_temp, center, warmup_temp=warmup_temp, warmup_epochs=warmup_epochs)
    loss, stats = loss_fn(gather_student([s[:, None] for s in leaves], plan),
                          torch.cat(teacher_views)[:, None], plan, epoch=1 if warmup else 3)
    loss.backward()

    ref_leaves = [s.clone().requires_grad_() for s in student_views]
    ref = dino_reference_loss(ref_leaves, teacher_views, center[0], temp_now)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["loss_cls"], ref.detach(), rtol=1e-5, atol=1e-5)
    assert "loss_patch" not in stats
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-7)
    want_center = 0.9 * center[0] + 0.1 * torch.cat(teacher_views).mean(0, keepdim=True)  # (1, K)
    torch.testing.assert_close(loss_fn.center, want_center[None], rtol=1e-6, atol=1e-6)


def test_loss_under_mixed_precision_is_computed_in_float32():
    """Under autocast (bfloat16 on the CPU here, float16 on a GPU) the loss, its diagnostics and the gradient
    equal the float32 ones: autocast would otherwise run the row dot products in half precision."""
    torch.manual_seed(0)
    K, B = 4096, 4
    batch = pwd.collate_multicrop([([torch.zeros(3, 4, 4)] * 4, patch_matching.cls_only_matches(4))] * B)
    plan = pwd.make_loss_plan(*batch[1:], view_tokens=[1] * 4, teacher_tokens=1)
    student, teacher = torch.randn(4 * B, K) * 3, torch.randn(2 * B, 1, K) * 0.3
    results = []
    for dtype in (None, torch.bfloat16):
        leaf = student.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, stats = make_loss(K, 1, 0.04, torch.zeros(1, 1, K))(leaf, teacher, plan, epoch=0)
        loss.backward()
        results.append((loss.detach(), stats, leaf.grad))
    (loss32, stats32, grad32), (loss16, stats16, grad16) = results
    torch.testing.assert_close(loss16, loss32, rtol=1e-6, atol=0)
    for name in stats32:
        torch.testing.assert_close(stats16[name], stats32[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad16, grad32, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunk_elements", [None, 24, 40])
@pytest.mark.parametrize("B,n_local,seed", [(1, 1, 0), (3, 2, 1), (4, 0, 2)])
def test_patch_loss_equals_per_image_per_pair_loop(B, n_local, seed, chunk_elements):
    """PatchWiseDINOLoss (chunked or not, its gradient computed in the same pass) equals the definition written
    as loops, and the code's own reference_loss (autograd through the plain formula)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    K, grids = 8, [3, 3] + [2] * n_local  # global views 3x3 patches, local views 2x2
    V, T = len(grids), 1 + 9
    matches = random_matches(rng, V, grids, B)
    batch = pwd.collate_multicrop([([torch.zeros(3, 4, 4)] * V, m) for m in matches])
    view_tokens = [1 + g * g for g in grids]
    plan = pwd.make_loss_plan(*batch[1:], view_tokens=view_tokens, teacher_tokens=T)
    distinct = {(v, b, s) for b, item in enumerate(matches) for _, v, _, idx_s in item for s in idx_s.tolist()}
    assert len(plan.student_rows) == len(distinct)  # the head runs once per (view, image, token)

    student_views = [torch.randn(B, t, K) * 2 for t in view_tokens]
    teacher = torch.randn(2 * B, T, K) * 0.2
    center = torch.randn(1, T, K) * 0.05
    leaves = [s.clone().requires_grad_() for s in student_views]
    loss_fn = make_loss(K, T, 0.06, center, chunk_elements=chunk_elements)
    loss, stats = loss_fn(gather_student(leaves, plan), teacher, plan, epoch=0)
    loss.backward()

    ref_leaves = [s.clone().requires_grad_() for s in student_views]
    ref = loop_reference_loss(ref_leaves, teacher, center, matches, 0.06)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)
    rows = gather_student(student_views, plan).requires_grad_()  # (S, K)
    code_ref = pwd.reference_loss(rows, teacher, plan, center, 0.06)
    (code_ref_grad,) = torch.autograd.grad(code_ref, rows)
    torch.testing.assert_close(loss.detach(), code_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gather_student([leaf.grad for leaf in leaves], plan), code_ref_grad,
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))
    assert set(stats) == {"loss_cls", "loss_patch", "teacher_entropy_cls", "teacher_entropy_patch", "kl_cls",
                          "kl_patch"}
    log_q = torch.log_softmax((teacher - center) / 0.06, -1)
    entropy = -(log_q.exp() * log_q).sum(-1)  # (2B, T)
    torch.testing.assert_close(stats["teacher_entropy_cls"], entropy[:, 0].mean())
    torch.testing.assert_close(stats["teacher_entropy_patch"], entropy[:, 1:].mean())
    assert stats["kl_cls"] >= 0 and stats["kl_patch"] >= 0


def test_shared_geometry_loss_equals_the_authors_formula():
    """Every image with the same crops (the authors' batches): our loss and gradient equal their formula."""
    torch.manual_seed(3)
    B, K, patch_size = 3, 16, 16
    geoms = ([transforms.sample_crop_geometry(256, 256, 48, (0.4, 1.0)) for _ in range(2)]
             + [transforms.sample_crop_geometry(256, 256, 32, (0.05, 0.4)) for _ in range(3)])
    matches = patch_matching.match_all_pairs(geoms, patch_size)
    assert max(len(idx_t) for _, _, idx_t, _ in matches) > 2  # some pairs share patches
    view_tokens = [1 + (g.out_size // patch_size) ** 2 for g in geoms]
    T = view_tokens[0]
    batch = pwd.collate_multicrop([([torch.zeros(3, 4, 4)] * len(geoms), matches)] * B)
    plan = pwd.make_loss_plan(*batch[1:], view_tokens=view_tokens, teacher_tokens=T)
    student_views = [torch.randn(B, t, K) * 2 for t in view_tokens]
    teacher, center = torch.randn(2 * B, T, K) * 0.3, torch.randn(1, T, K) * 0.05
    leaves = [s.clone().requires_grad_() for s in student_views]
    loss, _ = make_loss(K, T, 0.04, center)(gather_student(leaves, plan), teacher, plan, epoch=0)
    loss.backward()
    ref_leaves = [s.clone().requires_grad_() for s in student_views]
    ref = authors_loss(ref_leaves, teacher, center, {(i, v): (t, s) for i, v, t, s in matches}, 0.04)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-7)


def test_more_matches_in_one_image_leave_the_weight_of_the_others_unchanged():
    """Adding patch matches to image 0 reweighs image 0's entries only: image 1's [CLS] (and every other
    token of image 1) gets the same gradient."""
    rng = np.random.default_rng(4)
    torch.manual_seed(4)
    B, K, grids = 2, 8, [3, 3, 2]
    view_tokens, T = [1 + g * g for g in grids], 10
    few = random_matches(rng, 3, grids, B)
    few[0] = [(i, v, idx_t[:1], idx_s[:1]) for i, v, idx_t, idx_s in few[0]]  # image 0: [CLS] only
    more = [[(i, v, np.array([0, 1, 2]), np.array([0, 1, 2])) for i, v, _, _ in few[0]], few[1]]
    student_views = [torch.randn(B, t, K) for t in view_tokens]
    teacher = torch.randn(2 * B, T, K)
    grads = []
    for matches in (few, more):
        batch = pwd.collate_multicrop([([torch.zeros(3, 4, 4)] * 3, m) for m in matches])
        plan = pwd.make_loss_plan(*batch[1:], view_tokens=view_tokens, teacher_tokens=T)
        leaves = [s.clone().requires_grad_() for s in student_views]
        make_loss(K, T, 0.04, torch.zeros(1, T, K))(gather_student(leaves, plan), teacher, plan, epoch=0)[0].backward()
        grads.append([leaf.grad for leaf in leaves])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-9)  # image 1: unchanged
    assert not torch.allclose(grads[1][1][0, 0], grads[0][1][0, 0])  # image 0's [CLS] now shares its weight


TWO_PROCESS_LOSS_SCRIPT = """
import sys
import numpy as np, torch, torch.distributed as dist
sys.path[:0] = [{repo!r}, {tests!r}]
import patch_wise_dino as pwd
from test_patch_wise_dino import gather_student, random_matches

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
B, K, grids = 4, 8, [3, 3, 2, 2]  # the whole batch; each process holds B // world images
view_tokens, T = [1 + g * g for g in grids], 10
matches = random_matches(np.random.default_rng(1), 4, grids, B)
torch.manual_seed(1)
student_views = [torch.randn(B, t, K) * 2 for t in view_tokens]
teacher = torch.randn(2 * B, T, K) * 0.2  # (2B, T, K): global view 0 of every image, then view 1

def loss_and_grads(images):
    batch = pwd.collate_multicrop([([torch.zeros(3, 4, 4)] * 4, matches[b]) for b in images])
    plan = pwd.make_loss_plan(*batch[1:], view_tokens, T)
    leaves = [s[images].clone().requires_grad_() for s in student_views]
    loss_fn = pwd.PatchWiseDINOLoss(K, T, 0.06, 0.06, 0, nepochs=10)
    loss, _ = loss_fn(gather_student(leaves, plan), torch.cat([teacher[images], teacher[B + images]]), plan, 0)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]

mine = torch.arange(rank * B // world, (rank + 1) * B // world)
loss, grads = loss_and_grads(mine)
dist.all_reduce(loss)
whole_loss, whole_grads = loss_and_grads(torch.arange(B))  # one process, whole batch
torch.testing.assert_close(loss / world, whole_loss, rtol=1e-5, atol=1e-6)
for grad, whole in zip(grads, whole_grads):  # DDP averages: the gradient of image b is its share / world
    torch.testing.assert_close(grad / world, whole[mine], rtol=1e-4, atol=1e-7)
print("same as one process", flush=True)
"""


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """Under DDP the patch loss of the global batch equals one process's loss on the whole batch (value and
    gradient), although the processes hold different numbers of matched patches."""
    rng = np.random.default_rng(1)
    counts = [sum(len(m[2]) for m in item) for item in random_matches(rng, 4, [3, 3, 2, 2], 4)]
    assert sum(counts[:2]) != sum(counts[2:])  # the halves differ: a per-process mean over entries would differ
    script = tmp_path / "two_process_loss.py"
    script.write_text(TWO_PROCESS_LOSS_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests")))
    proc = run_script(str(script), [], nproc=2, timeout=300, threads=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("same as one process") == 2


def test_matched_token_changes_loss_unmatched_and_padding_do_not():
    rng = np.random.default_rng(5)
    torch.manual_seed(5)
    B, K, grids = 2, 8, [3, 3, 2]
    view_tokens, T = [1 + g * g for g in grids], 10
    matches = random_matches(rng, 3, grids, B)
    # image 0: global 0 <-> local 2 share exactly global token 4 / local token 3
    matches[0][1] = (0, 2, np.array([0, 4]), np.array([0, 3]))
    matches[0][3] = (1, 2, np.array([0]), np.array([0]))
    batch = pwd.collate_multicrop([([torch.zeros(3, 4, 4)] * 3, m) for m in matches])
    student = [torch.randn(B, t, K) for t in view_tokens]
    teacher = torch.randn(2 * B, T, K)

    def loss_of(student_views, teacher_out, b=batch):
        plan = pwd.make_loss_plan(*b[1:], view_tokens=view_tokens, teacher_tokens=T)
        loss_fn = make_loss(K, T, 0.04, torch.zeros(1, T, K))
        return loss_fn(gather_student(student_views, plan), teacher_out, plan, epoch=0)[0]

    base = loss_of(student, teacher)
    unmatched = [t for t in range(view_tokens[2]) if t not in (0, 3)]
    changed = [s.clone() for s in student]
    changed[2][0, 3] += torch.randn(K)  # matched student token
    assert not torch.allclose(loss_of(changed, teacher), base)
    changed = [s.clone() for s in student]
    changed[2][0, unmatched] += 5 * torch.randn(len(unmatched), K)  # local view 2, image 0: tokens no pair uses
    assert torch.equal(loss_of(changed, teacher), base)
    changed_teacher = teacher.clone()
    changed_teacher[0, 4] = -teacher[0, 4]  # matched teacher token of image 0, global 0: another argmax
    assert not torch.allclose(loss_of(student, changed_teacher), base)

    padded = batch.mask.logical_not()
    assert padded.any()
    garbage = batch._replace(teacher_idx=torch.where(padded, 1, batch.teacher_idx),
                             student_idx=torch.where(padded, 1, batch.student_idx))
    changed = [s.clone() for s in student]
    for s in changed:
        s[:, 1] += 3 * torch.randn(B, K)  # what the garbage padding now points at, where it is not matched itself
    matched_1 = {(v, b) for b, item in enumerate(matches) for _, v, _, idx_s in item if 1 in idx_s.tolist()}
    for v, b in matched_1:
        changed[v][b, 1] = student[v][b, 1]
    assert torch.equal(loss_of(changed, teacher, garbage), loss_of(student, teacher, batch))


def test_fewer_than_two_views_is_a_value_error():
    batch = pwd.collate_multicrop([([torch.zeros(3, 4, 4)] * 2, patch_matching.cls_only_matches(2))])
    with pytest.raises(ValueError, match="at least 2 views"):
        pwd.make_loss_plan(*batch[1:], view_tokens=[1], teacher_tokens=1)
    with pytest.raises(ValueError, match=r"^inconsistent matches: pairs \(0, 2\), indices \(0, 1, 1\), \(0, 1, 1\), "
                                         r"mask \(0, 1, 1\)$"):
        pwd.make_loss_plan(batch.pairs[:0], batch.teacher_idx[:0], batch.student_idx[:0], batch.mask[:0],
                           view_tokens=[1, 1], teacher_tokens=1)


def test_out_of_range_matches_are_refused():
    batch = pwd.collate_multicrop([([torch.zeros(3, 4, 4)] * 2, [(0, 1, np.array([0, 5]), np.array([0, 1])),
                                                                 (1, 0, np.array([0]), np.array([0]))])])
    with pytest.raises(ValueError, match="^matches refer to views or tokens that the crops do not have$"):
        pwd.make_loss_plan(*batch[1:], view_tokens=[5, 5], teacher_tokens=5)


def test_collate_pads_and_masks():
    items = [([torch.full((3, 8, 8), float(b)), torch.zeros(3, 4, 4)],
              [(0, 1, np.arange(n), np.arange(n) + 1), (1, 0, np.array([0]), np.array([0]))])
             for b, n in enumerate([1, 4, 2])]
    batch = pwd.collate_multicrop(items)
    assert [tuple(c.shape) for c in batch.crops] == [(3, 3, 8, 8), (3, 3, 4, 4)]
    assert batch.crops[0][2].eq(2).all()
    assert batch.pairs.tolist() == [[0, 1], [1, 0]]
    assert batch.mask.shape == (2, 3, 4)
    assert batch.mask[0].sum(1).tolist() == [1, 4, 2] and batch.mask[1].sum(1).tolist() == [1, 1, 1]
    assert batch.student_idx[0, 1].tolist() == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------------
# One training step against DINO's
# ----------------------------------------------------------------------------------------------------
def tiny_wrapper(seed):
    torch.manual_seed(seed)
    backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)
    return vits.MultiCropWrapper(backbone, DINOHead(24, 40, hidden_dim=32, bottleneck_dim=16))


def clip_reference(model, clip):
    for p in model.parameters():
        if p.grad is not None:
            coef = clip / (p.grad.norm() + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


@pytest.mark.parametrize("B,n_local,teacher_temp,epoch", [(2, 0, 0.04, 1), (3, 2, 0.07, 0), (4, 3, 0.04, 2)])
def test_cls_only_training_step_equals_dino(B, n_local, teacher_temp, epoch):
    torch.manual_seed(10 + B)
    V = 2 + n_local
    crops = [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(n_local)]
    batch = pwd.collate_multicrop([([c[b] for c in crops], patch_matching.cls_only_matches(V)) for b in range(B)])
    student = tiny_wrapper(0)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    student_ref, teacher_ref = copy.deepcopy(student), copy.deepcopy(teacher)
    center = torch.randn(1, 1, 40) * 0.1
    lr, wd, momentum, clip = 1e-3, 0.05, 0.99, 0.5

    loss_fn = make_loss(40, 1, teacher_temp, center)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    state = pwd.TrainState(student, teacher, loss_fn, optimizer, pwd.Precision("cpu", None, None))
    args = argparse.Namespace(patch_loss=False, clip_grad=clip, freeze_last_layer=1, output_dir="unused")
    values = pwd.train_step(state, batch, epoch, lr, wd, momentum, args)

    # DINO, written out: [CLS] of every view through backbone + head, loss, clip, freeze, AdamW, EMA
    optimizer_ref = torch.optim.AdamW(utils.get_params_groups(student_ref))
    for i, group in enumerate(optimizer_ref.param_groups):
        group["lr"] = lr
        group["weight_decay"] = wd if i == 0 else 0.0
    teacher_out = teacher_ref.head(teacher_ref.backbone(torch.cat(crops[:2]))).chunk(2)
    student_out = [student_ref.head(student_ref.backbone(c)) for c in crops]
    ref = dino_reference_loss(student_out, teacher_out, center[0], teacher_temp)
    ref.backward()
    clip_reference(student_ref, clip)
    if epoch < 1:
        student_ref.head.last_layer.weight_v.grad = None
    optimizer_ref.step()
    with torch.no_grad():
        for ps, pt in zip(student_ref.parameters(), teacher_ref.parameters()):
            pt.mul_(momentum).add_((1 - momentum) * ps)

    assert values["loss"] == pytest.approx(ref.item(), rel=1e-5)
    for (name, got), want in zip(student.named_parameters(), student_ref.parameters()):
        if want.grad is None:
            assert got.grad is None, name
            continue
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4 * want.grad.abs().max().item())
        # Adam's first step is about lr * sign(gradient): float noise in a gradient near Adam's eps (e.g. the
        # key bias, which softmax ignores) moves a weight by up to 2 lr; elsewhere weights agree to fp precision.
        tol = torch.where(want.grad.abs() < 1e-6, 2.5 * lr, 1e-6)
        assert ((got - want).abs() <= tol).all(), f"student {name}"
    for (name, got), want, ps in zip(teacher.named_parameters(), teacher_ref.parameters(), student_ref.parameters()):
        tol = (1 - momentum) * 2.5 * lr if ps.grad is not None and (ps.grad.abs() < 1e-6).any() else 1e-6
        torch.testing.assert_close(got, want, rtol=0, atol=tol, msg=f"teacher {name}")
    want_center = 0.9 * center + 0.1 * torch.cat(teacher_out).detach().mean(0)
    torch.testing.assert_close(loss_fn.center, want_center, rtol=1e-5, atol=1e-6)
    last_layer_moved = not torch.equal(student.head.last_layer.weight_v, tiny_wrapper(0).head.last_layer.weight_v)
    assert last_layer_moved == (epoch >= 1)  # frozen during the first --freeze_last_layer epochs


def test_patch_training_step_reaches_every_parameter():
    torch.manual_seed(3)
    B, V = 2, 4
    crops = [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(2)]
    rng = np.random.default_rng(0)
    matches = random_matches(rng, V, [4, 4, 2, 2], B)
    batch = pwd.collate_multicrop([([c[b] for c in crops], matches[b]) for b in range(B)])
    student = tiny_wrapper(1)
    student.head.last_layer.weight_g.requires_grad = True
    teacher = copy.deepcopy(student).requires_grad_(False)
    loss_fn = make_loss(40, 17, 0.04, torch.zeros(1, 17, 40))
    before = copy.deepcopy(student)
    state = pwd.TrainState(student, teacher, loss_fn, torch.optim.SGD(student.parameters(), lr=0.1),
                           pwd.Precision("cpu", None, None))
    args = argparse.Namespace(patch_loss=True, clip_grad=0.0, freeze_last_layer=0, output_dir="unused")
    values = pwd.train_step(state, batch, 0, 0.1, 0.0, 0.9, args)
    assert all(np.isfinite(v) for v in values.values())
    for (name, p), p0 in zip(student.named_parameters(), before.parameters()):
        assert not torch.equal(p, p0), f"{name} got no gradient"
    assert loss_fn.center.abs().sum() > 0


def test_bfloat16_autocast_step_is_close_to_float32():
    """The half-precision path (bf16 head outputs into the loss, gradient cast back) on the CPU."""
    torch.manual_seed(4)
    B, V = 2, 4
    crops = [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(2)]
    matches = random_matches(np.random.default_rng(4), V, [4, 4, 2, 2], B)
    batch = pwd.collate_multicrop([([c[b] for c in crops], matches[b]) for b in range(B)])
    args = argparse.Namespace(patch_loss=True, clip_grad=3.0, freeze_last_layer=0, output_dir="unused")
    runs = {}
    for dtype in (None, torch.bfloat16):
        student = tiny_wrapper(2)
        teacher = copy.deepcopy(student).requires_grad_(False)
        state = pwd.TrainState(student, teacher, make_loss(40, 17, 0.1, torch.zeros(1, 17, 40)),
                               torch.optim.SGD(student.parameters(), lr=0.1), pwd.Precision("cpu", dtype, None))
        runs[dtype] = pwd.train_step(state, batch, 0, 0.1, 0.0, 0.9, args), student
    (full, student_full), (half, student_half) = runs[None], runs[torch.bfloat16]
    assert half["loss"] == pytest.approx(full["loss"], rel=2e-2)
    for (name, p), q in zip(student_half.named_parameters(), student_full.parameters()):
        if not p.requires_grad:
            continue
        assert p.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        cosine = F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cosine > 0.9, f"{name}: bf16 gradient points elsewhere ({cosine:.3f})"


def test_compile_without_a_cpp_compiler_on_cpu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(pwd.shutil, "which", lambda name: None)
    model = tiny_wrapper(0)
    with pytest.raises(utils.UserError, match="needs a C.. compiler"):
        pwd.compile_blocks(model, torch.device("cpu"))
    assert all(getattr(block, "_compiled_call_impl", None) is None for block in model.backbone.blocks)


def test_defaults_are_the_authors_recipe():
    """Without flags the run is the authors' (ViT-S/8, K = 10000, 6 images per GPU); the rest is DINO's."""
    args = argparse.ArgumentParser(parents=[pwd.get_args_parser()]).parse_args([])
    authors = {"arch": "vit_small", "patch_size": 8, "out_dim": 10000, "batch_size_per_gpu": 6}
    dino = {"lr": 0.0005, "min_lr": 1e-6, "epochs": 100, "warmup_epochs": 10, "optimizer": "adamw",
            "weight_decay": 0.04, "weight_decay_end": 0.4, "clip_grad": 3.0, "freeze_last_layer": 1,
            "momentum_teacher": 0.996, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 0, "norm_last_layer": True, "use_bn_in_head": False, "use_fp16": True,
            "drop_path_rate": 0.1, "local_crops_number": 8, "global_crops_scale": (0.4, 1.0),
            "local_crops_scale": (0.05, 0.4), "global_size": 224, "local_size": 96, "resize": 256,
            "center_momentum": 0.9, "patch_loss": True}
    assert {name: getattr(args, name) for name in {**authors, **dino}} == {**authors, **dino}


# ----------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------
def test_cosine_scheduler_warmup_and_ends():
    s = pwd.cosine_scheduler(1.0, 0.1, epochs=3, niter_per_ep=4, warmup_epochs=1, start_warmup_value=0.0)
    assert len(s) == 12
    np.testing.assert_allclose(s[:4], [0, 1 / 3, 2 / 3, 1])  # DINO: the warm-up's last step is the peak
    assert s[4] == pytest.approx(1.0)
    # Half cosine over the 8 remaining steps: value at step j is 0.1 + 0.45 * (1 + cos(pi j / 8)).
    np.testing.assert_allclose(s[4:], 0.1 + 0.45 * (1 + np.cos(np.pi * np.arange(8) / 8)))
    assert np.all(np.diff(s[4:]) < 0)
