"""Meta-gradients of Eq. 10 against finite differences, learn2learn's MAML and each other."""
from __future__ import annotations

import learn2learn as l2l
import pytest
import torch
from torch.nn import functional as F

from tsmd_ray.models import statistics_from_first

from .helpers import objective, params, random_tasks, tiny_pair


def _loss(obj, psi, theta, tasks, keys):
    """The summed query losses ``keys`` alone (detached weights: no outer gradient is computed)."""
    detach = lambda w: {k: v.detach() for k, v in w.items()}  # noqa: E731
    metrics = obj.gradient_sums(detach(psi), detach(theta), tasks)[2]
    return sum(metrics[key] for key in keys)


def _finite_difference(obj, psi, theta, tasks, weights, name, keys, eps=1e-6):
    p = weights[name]
    idx = tuple(int(i) for i in torch.randint(0, 1, (p.dim(),)))
    with torch.no_grad():
        old = p[idx].item()
        p[idx] = old + eps
        plus = _loss(obj, psi, theta, tasks, keys)
        p[idx] = old - eps
        minus = _loss(obj, psi, theta, tasks, keys)
        p[idx] = old
    return (plus - minus) / (2 * eps), idx


def _assert_gradients_match_finite_differences(obj, psi, theta, tasks, psi_keys=("teacher/loss",)):
    """Outer gradients of psi (of the query losses ``psi_keys``) and theta (of the student's query
    loss) against central differences, for about four tensors of each model."""
    grads_psi, grads_theta, _ = obj.gradient_sums(psi, theta, tasks)
    checked = 0
    for weights, grads, keys in ((psi, grads_psi, psi_keys), (theta, grads_theta, ("student/loss",))):
        for name in list(weights)[:: max(1, len(weights) // 4)]:
            numeric, idx = _finite_difference(obj, psi, theta, tasks, weights, name, keys)
            assert grads[name][idx].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8), name
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("statistics", ["support", "transductive"])
@pytest.mark.parametrize("teacher_kind", ["conv4", "resnet12"])
@pytest.mark.parametrize("kd", ["kl", "rkd"])
def test_second_order_gradients_match_finite_differences(teacher_kind, kd, statistics):
    teacher, student = tiny_pair(teacher_kind=teacher_kind)
    # RKD's weights (25, 50) make inner steps of tiny random models large enough to cross ReLU
    # kinks within the finite-difference step; a small KD weight keeps the check smooth.
    obj = objective(teacher, student, kd=kd, kd_weight=1.0 if kd == "kl" else 0.02, query_statistics=statistics)
    _assert_gradients_match_finite_differences(obj, *params(teacher, student), random_tasks(2))


@pytest.mark.parametrize("learn_to_teach", [False, True])
@pytest.mark.parametrize("kd", ["kl", "rkd"])
def test_second_order_gradients_with_kd_views_match_finite_differences(kd, learn_to_teach):
    """KD on views: theta's gradient runs through the adapted teacher's targets on the views, and
    with learning to teach psi's gradient takes the student's query loss through them too."""
    teacher, student = tiny_pair()
    obj = objective(teacher, student, kd=kd, kd_weight=1.0 if kd == "kl" else 0.02, learn_to_teach=learn_to_teach)
    psi_keys = ("teacher/loss", "student/loss") if learn_to_teach else ("teacher/loss",)
    _assert_gradients_match_finite_differences(obj, *params(teacher, student), random_tasks(2, views=2), psi_keys)


def test_first_order_differs_from_second_order():
    teacher, student = tiny_pair()
    psi, theta = params(teacher, student)
    tasks = random_tasks(2)
    second = objective(teacher, student).gradient_sums(psi, theta, tasks)
    first = objective(teacher, student, first_order_teacher=True, first_order_student=True).gradient_sums(psi, theta, tasks)
    name = "features.0.0.weight"
    assert not torch.allclose(second[0][name], first[0][name])
    assert not torch.allclose(second[1][name], first[1][name])


def _query_logits(learner, support_x, query_x, statistics):
    """The query forward of a learn2learn clone: the query batch alone, or behind the support set
    with statistics taken from the support rows."""
    if statistics == "transductive":
        return learner(query_x)
    with statistics_from_first(len(support_x)):
        return learner(torch.cat([support_x, query_x]))[len(support_x):]


@pytest.mark.parametrize("statistics", ["support", "transductive"])
def test_student_gradient_without_kd_equals_learn2learn_maml(statistics):
    teacher, student = tiny_pair()
    tasks = random_tasks(3)
    psi, theta = params(teacher, student)
    ours = objective(teacher, student, kd_weight=0.0, query_statistics=statistics).gradient_sums(psi, theta, tasks)[1]

    maml = l2l.algorithms.MAML(student, lr=0.2, first_order=False)
    maml.zero_grad()
    for i in range(len(tasks)):
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(tasks.support_x[i]), tasks.support_y[i]))
        logits = _query_logits(learner, tasks.support_x[i], tasks.query_x[i], statistics)
        F.cross_entropy(logits, tasks.query_y[i]).backward()
    for name, p in student.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-5)


def test_kd_reaches_theta_through_the_adapted_teacher():
    teacher, student = tiny_pair()
    tasks = random_tasks(2)
    psi, theta = params(teacher, student)
    before = objective(teacher, student).gradient_sums(psi, theta, tasks)[1]
    with torch.no_grad():  # a different psi must change theta's update through psi' in L_KD
        teacher.head.weight.mul_(3.0)
    after = objective(teacher, student).gradient_sums(psi, theta, tasks)[1]
    assert not torch.allclose(before["head.weight"], after["head.weight"])
    without_kd = objective(teacher, student, kd_weight=0.0).gradient_sums(psi, theta, tasks)[1]
    with torch.no_grad():
        teacher.head.weight.div_(3.0)
    again = objective(teacher, student, kd_weight=0.0).gradient_sums(psi, theta, tasks)[1]
    torch.testing.assert_close(without_kd["head.weight"], again["head.weight"], rtol=0, atol=0)


def test_student_loss_does_not_leak_into_psi():
    """Eq. 10a: psi's gradient is the teacher's query loss alone, whatever the student does."""
    teacher, student = tiny_pair()
    tasks = random_tasks(2)
    psi, theta = params(teacher, student)
    with_student = objective(teacher, student).gradient_sums(psi, theta, tasks)[0]
    teacher_only = objective(teacher, None).gradient_sums(psi, {}, tasks)[0]
    for name in with_student:
        torch.testing.assert_close(with_student[name], teacher_only[name], rtol=0, atol=0)
    taught = objective(teacher, student, learn_to_teach=True).gradient_sums(psi, theta, tasks)[0]
    assert not torch.allclose(taught["head.weight"], teacher_only["head.weight"])


@pytest.mark.parametrize("views", [0, 2])
@pytest.mark.parametrize("statistics", ["support", "transductive"])
@pytest.mark.parametrize("teacher_kind", ["conv4", "resnet12"])
@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_vmap_and_loop_agree_with_batch_norm(teacher_kind, algorithm, statistics, views):
    teacher, student = tiny_pair(teacher_kind=teacher_kind)
    tasks = random_tasks(4, views=views)
    psi, theta = params(teacher, student)
    settings = dict(algorithm=algorithm, query_statistics=statistics)
    loop = objective(teacher, student, **settings).gradient_sums(psi, theta, tasks)
    for chunk in (4, 3):
        vmapped = objective(teacher, student, vmap_chunk=chunk, **settings).gradient_sums(psi, theta, tasks)
        for ours, theirs in zip(loop[:2], vmapped[:2]):
            for name in ours:
                torch.testing.assert_close(ours[name], theirs[name], rtol=1e-10, atol=1e-12)
        assert loop[2] == pytest.approx(vmapped[2], rel=1e-10)


def test_fixed_teacher_gets_no_gradient_and_no_adaptation():
    teacher, student = tiny_pair()
    teacher.requires_grad_(False)
    tasks = random_tasks(2)
    psi, theta = params(teacher, student)
    grads_psi, grads_theta, metrics = objective(teacher, student, kd="rkd", adapt_teacher=False).gradient_sums(psi, theta, tasks)
    assert grads_psi == {}
    assert set(grads_theta) == set(theta)
    assert set(metrics) == {"student/loss", "student/acc"}  # its untrained head is never scored


def test_reptile_gradient_is_the_mean_displacement():
    teacher, student = tiny_pair()
    tasks = random_tasks(2)
    psi, theta = params(teacher, None)
    grads = objective(teacher, None, algorithm="reptile", steps=3).gradient_sums(psi, {}, tasks)[0]
    expected = {k: torch.zeros_like(v) for k, v in psi.items()}
    for i in range(2):
        adapted = {k: v.detach().clone().requires_grad_() for k, v in psi.items()}
        for _ in range(3):
            loss = F.cross_entropy(torch.func.functional_call(teacher, adapted, (tasks.support_x[i],)), tasks.support_y[i])
            g = torch.autograd.grad(loss, list(adapted.values()))
            adapted = {k: (v - 0.3 * gi).detach().requires_grad_() for (k, v), gi in zip(adapted.items(), g)}
        for k in expected:
            expected[k] += psi[k].detach() - adapted[k].detach()
    for k in expected:
        torch.testing.assert_close(grads[k], expected[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("teacher_kind", ["conv4", "resnet12"])
def test_fused_batch_norm_gives_the_same_meta_gradients_per_task(teacher_kind):
    from tsmd_ray.models import use_fused_batchnorm

    teacher, student = tiny_pair(teacher_kind=teacher_kind)
    tasks = random_tasks(2)
    psi, theta = params(teacher, student)
    primitive = objective(teacher, student).gradient_sums(psi, theta, tasks)
    use_fused_batchnorm(teacher, True)
    use_fused_batchnorm(student, True)
    fused = objective(teacher, student).gradient_sums(psi, theta, tasks)
    for ours, theirs in zip(primitive[:2], fused[:2]):
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-12)


def test_kd_views_reach_theta_and_not_psi():
    """Views add KD targets for the student (Eq. 7); psi still learns from its own query loss alone."""
    teacher, student = tiny_pair()
    psi, theta = params(teacher, student)
    plain = objective(teacher, student).gradient_sums(psi, theta, random_tasks(2))
    viewed = objective(teacher, student).gradient_sums(psi, theta, random_tasks(2, views=2))
    for name in plain[0]:
        torch.testing.assert_close(plain[0][name], viewed[0][name], rtol=0, atol=0)
    assert not torch.allclose(plain[1]["head.weight"], viewed[1]["head.weight"])
    assert plain[2]["teacher/loss"] == viewed[2]["teacher/loss"]
