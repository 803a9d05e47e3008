"""Eq. 8 scoring: query images are classified with support-set statistics, one by one."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tsmd_ray.algorithms import (InnerSettings, Outputs, adapt_student, adapt_teacher, forward, inner_loop, kd_outputs,
                                 make_kd_loss, parameters_of, query_logits, run_task)

from .helpers import WAYS, random_tasks, tiny_pair


def _adapted_logits(statistics: str, query_x: torch.Tensor) -> torch.Tensor:
    teacher, student = tiny_pair()
    tasks = random_tasks(1)
    settings = InnerSettings(steps=2, alpha=0.3, lam=0.2, adapt_teacher=True, query_statistics=statistics)
    _, psi_task, theta_task = run_task(teacher, student, make_kd_loss("kl"), settings, parameters_of(teacher),
                                       parameters_of(student), tasks.support_x[0], tasks.support_y[0],
                                       tasks.query_x[0], tasks.query_y[0])
    return torch.stack([query_logits(model, params, tasks.support_x[0], query_x, statistics)
                        for model, params in ((teacher, psi_task), (student, theta_task))])


def test_a_query_prediction_does_not_depend_on_the_other_query_images():
    query = random_tasks(1).query_x[0]
    changed = query.clone()
    changed[1:] = torch.randn_like(changed[1:]) * 3 + 1  # every other query image replaced
    alone = query[:1]
    logits = [_adapted_logits("support", x)[:, 0] for x in (query, changed, alone)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits[0], logits[2], rtol=1e-10, atol=1e-12)


def test_transductive_statistics_do_depend_on_the_other_query_images():
    query = random_tasks(1).query_x[0]
    changed = query.clone()
    changed[1:] = torch.randn_like(changed[1:]) * 3 + 1
    first = [_adapted_logits("transductive", x)[:, 0] for x in (query, changed)]
    assert not torch.allclose(first[0], first[1])


@pytest.mark.parametrize("statistics", ["support", "transductive"])
def test_run_task_scores_the_query_with_the_chosen_statistics(statistics):
    teacher, student = tiny_pair()
    tasks = random_tasks(1)
    settings = InnerSettings(steps=2, alpha=0.3, lam=0.2, adapt_teacher=True, query_statistics=statistics)
    metrics, _, theta_task = run_task(teacher, student, make_kd_loss("kl"), settings, parameters_of(teacher),
                                      parameters_of(student), tasks.support_x[0], tasks.support_y[0],
                                      tasks.query_x[0], tasks.query_y[0])
    logits = query_logits(student, theta_task, tasks.support_x[0], tasks.query_x[0], statistics)
    expected = torch.nn.functional.cross_entropy(logits, tasks.query_y[0])
    torch.testing.assert_close(metrics["student/loss"], expected)


def test_without_views_the_student_adapts_by_eq7_exactly():
    """kd_views=0 is the paper's Eq. 7 on the support set, bit for bit: theta'_i and the meta-gradient
    of the student's query loss equal those of the equation written out here."""
    teacher, student = tiny_pair()
    tasks = random_tasks(1)
    x, y, qx, qy = tasks.support_x[0], tasks.support_y[0], tasks.query_x[0], tasks.query_y[0]
    s, kd = InnerSettings(steps=2, alpha=0.3, lam=0.2, adapt_teacher=True), make_kd_loss("kl", temperature=2.0)
    psi, theta = parameters_of(teacher), parameters_of(student)
    metrics, _, theta_task = run_task(teacher, student, kd, s, psi, theta, x, y, qx, qy)
    target = Outputs(*(t.detach() for t in forward(teacher, adapt_teacher(teacher, psi, x, y, s), x)))

    def eq7(p):
        out = forward(student, p, x)
        return F.cross_entropy(out.logits, y) + kd(out, target)

    expected = inner_loop(eq7, theta, s.steps, s.lam, first_order=False)
    query_loss = F.cross_entropy(query_logits(student, expected, x, qx), qy)
    for name in theta:
        assert torch.equal(theta_task[name], expected[name]), name
    assert torch.equal(metrics["student/loss"], query_loss)
    ours = torch.autograd.grad(metrics["student/loss"], list(theta.values()))
    for name, g, h in zip(theta, ours, torch.autograd.grad(query_loss, list(theta.values()))):
        assert torch.equal(g, h), name


def test_views_are_normalised_with_the_support_statistics():
    """The KD rows [support; views]: support rows as without views (so L_S is unchanged), and each
    view normalised with the support set's statistics, independently of the other views."""
    tasks = random_tasks(1, views=2)
    x, views = tasks.support_x[0], tasks.support_views[0]
    rows = x.shape[0]
    for model in tiny_pair():
        p = parameters_of(model)
        both = kd_outputs(model, p, x, views)
        assert both.logits.shape[0] == rows + views.shape[0]
        for ours, alone in zip(both, forward(model, p, x)):
            torch.testing.assert_close(ours[:rows], alone, rtol=1e-10, atol=1e-12)
        for ours, one in zip(both, kd_outputs(model, p, x, views[:1])):
            torch.testing.assert_close(ours[rows:rows + 1], one[rows:], rtol=1e-10, atol=1e-12)


def test_a_students_views_take_the_labels_as_a_one_hot_teacher_would_give_them():
    """Without a teacher (method student) the views are a control: L_KD is the cross-entropy of the
    rows [support; views] against their images' labels, i.e. KL at T = 1 from a one-hot teacher."""
    _, student = tiny_pair()
    tasks = random_tasks(1, views=2)
    x, y, qx, qy, views = (tasks.support_x[0], tasks.support_y[0], tasks.query_x[0], tasks.query_y[0],
                           tasks.support_views[0])
    s = InnerSettings(steps=2, alpha=0.3, lam=0.2, adapt_teacher=False, kd_weight=0.5)
    kl = make_kd_loss("kl", temperature=1.0)
    theta = parameters_of(student)
    _, _, labelled = run_task(None, student, kl, s, {}, theta, x, y, qx, qy, views)
    one_hot = Outputs(60.0 * F.one_hot(y.repeat(3), WAYS).to(x.dtype), torch.zeros(3 * len(y), 1))
    expected = adapt_student(student, theta, x, y, one_hot, kl, s, views)
    plain = adapt_student(student, theta, x, y, None, kl, s)
    for name in theta:
        torch.testing.assert_close(labelled[name], expected[name], rtol=1e-6, atol=1e-8)
    assert any(not torch.allclose(labelled[n], plain[n]) for n in theta)  # the views do change theta'
