"""The few-shot classifiers: the scikit-learn / numpy reference (one episode at a time) and their batched
torch versions (many episodes of the same shape at once, float64), with the same objectives.

LR: multinomial logistic regression, L2 penalty 0.5 * ||W||^2 on the weights only, C on the data term
(scikit-learn's ``LogisticRegression(C, lbfgs)``); SVM: linear SVC after standardisation (scikit-learn in
both back ends); NN: nearest support; Cosine: most similar support; Proto: nearest class mean (rule
``mean``: over all support copies; ``rfs``: query block b against support copy b, as the RFS code).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from search_lib.core.errors import UsageError

# A classifier takes (support features, support labels, query features), all numpy, and returns the
# predicted query labels; options (C, proto_rule, n_aug) are keywords that a classifier may ignore.
Classifier = Callable[..., np.ndarray]


# --------------------------------------------------------------------------------------------------
# classifiers
# --------------------------------------------------------------------------------------------------

def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale each row of ``x`` to unit Euclidean norm (rows of zeros stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def _logistic_regression(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray, C: float = 1.0, **_) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    # No ``multi_class`` argument: it was removed in scikit-learn 1.7 (multinomial is the default).
    clf = LogisticRegression(C=float(C), solver="lbfgs", max_iter=1000)
    clf.fit(sx, sy)
    return clf.predict(qx)


def _svm(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray, **_) -> np.ndarray:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    clf = make_pipeline(StandardScaler(), SVC(C=1.0, kernel="linear", decision_function_shape="ovr"))
    clf.fit(sx, sy)
    return clf.predict(qx)


def _nearest_neighbour(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray, **_) -> np.ndarray:
    # squared Euclidean distances, queries x support
    d = (qx ** 2).sum(1)[:, None] - 2.0 * qx @ sx.T + (sx ** 2).sum(1)[None, :]
    return np.asarray(sy)[np.argmin(d, axis=1)]


def _cosine(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray, **_) -> np.ndarray:
    sim = l2_normalize(qx) @ l2_normalize(sx).T
    return np.asarray(sy)[np.argmax(sim, axis=1)]


def _prototype(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray, proto_rule: str = "mean", n_aug: int = 1,
               **_) -> np.ndarray:
    """Nearest class mean. ``mean`` (this project): one prototype per class over all support copies.
    ``rfs`` (the RFS code): the support set is ``n_aug`` consecutive copies; the queries, in ``n_aug``
    consecutive blocks, block b is scored against the prototypes of copy b alone."""
    sy = np.asarray(sy)
    classes = np.unique(sy)
    if proto_rule == "rfs" and n_aug > 1:
        copies, blocks = _rfs_blocks(len(sy), len(qx), n_aug)
        return np.concatenate([_prototype(sx[c], sy[c], qx[b]) for c, b in zip(copies, blocks)])
    protos = np.stack([sx[sy == c].mean(axis=0) for c in classes])
    d = (qx ** 2).sum(1)[:, None] - 2.0 * qx @ protos.T + (protos ** 2).sum(1)[None, :]
    return classes[np.argmin(d, axis=1)]


def _rfs_blocks(n_support: int, n_query: int, n_aug: int) -> tuple[list[slice], list[slice]]:
    if n_support % n_aug or n_query % n_aug:
        raise UsageError(f"--proto_rule rfs needs the supports ({n_support}) and the queries ({n_query}) of an "
                         f"episode to split into --n_aug_support_samples={n_aug} blocks; use --proto_rule mean")
    ns, nq = n_support // n_aug, n_query // n_aug
    return ([slice(a * ns, (a + 1) * ns) for a in range(n_aug)], [slice(a * nq, (a + 1) * nq) for a in range(n_aug)])


BACKENDS = ("torch", "sklearn")
PROTO_RULES = ("mean", "rfs")

CLASSIFIERS: dict[str, Classifier] = {
    "LR": _logistic_regression,
    "SVM": _svm,
    "NN": _nearest_neighbour,
    "Cosine": _cosine,
    "Proto": _prototype,
}


def get_classifier(name: str) -> Classifier:
    """Look a classifier up by name (case-insensitive); unknown names raise UsageError."""
    for key, fn in CLASSIFIERS.items():
        if key.lower() == str(name).lower():
            return fn
    raise UsageError(f"unknown classifier {name!r}; use one of {', '.join(CLASSIFIERS)}")


def canonical_classifier(name: str) -> str:
    """The registry spelling of a classifier name (raises UsageError when unknown)."""
    get_classifier(name)
    return next(key for key in CLASSIFIERS if key.lower() == str(name).lower())


# --------------------------------------------------------------------------------------------------
# batched classifiers (torch, float64): many episodes of the same shape at once
# --------------------------------------------------------------------------------------------------

_DAMP = 1e-10  # keeps the preconditioned CG defined along the shift direction of b (gradient 0 there)


def _dot(a1: torch.Tensor, a2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """Per-episode inner product of two (W, b) pairs."""
    return (a1 * a2).sum((1, 2)) + (c1 * c2).sum(1)


def _lr_objective(x: torch.Tensor, y1h: torch.Tensor, C: float, W: torch.Tensor,
                  b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax probabilities (e, n, K) and scikit-learn's objective (e,) at (W, b)."""
    logits = torch.baddbmm(b[:, None, :], x, W.transpose(1, 2))
    lse = torch.logsumexp(logits, dim=2)
    f = C * (lse - (logits * y1h).sum(2)).sum(1) + 0.5 * (W * W).sum((1, 2))
    return torch.exp(logits - lse[:, :, None]), f


def _newton_direction(x: torch.Tensor, x2: torch.Tensor, p: torch.Tensor, gW: torch.Tensor, gb: torch.Tensor,
                      C: float, max_cg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Newton step s with H s = -g, by conjugate gradients preconditioned with the Hessian's diagonal
    (Jacobi), on Hessian-vector products, to a residual that tightens as g shrinks (superlinear Newton)."""
    w = C * p * (1.0 - p)
    mW = 1.0 / (torch.bmm(w.transpose(1, 2), x2) + 1.0)
    mb = 1.0 / (w.sum(1) + _DAMP)

    def hvp(V, c):
        u = torch.baddbmm(c[:, None, :], x, V.transpose(1, 2))  # (e, n, K)
        pu = p * u
        s_ = C * (pu - p * pu.sum(2, keepdim=True))
        return torch.bmm(s_.transpose(1, 2), x) + V, s_.sum(1) + _DAMP * c

    gnorm2 = _dot(gW, gW, gb, gb)
    target = torch.clamp(gnorm2.sqrt(), max=0.1) ** 2 * gnorm2
    sW, sb = torch.zeros_like(gW), torch.zeros_like(gb)
    rW, rb = -gW, -gb
    zW, zb = mW * rW, mb * rb
    dW, db = zW, zb
    rz = _dot(rW, zW, rb, zb)
    res = gnorm2
    for _ in range(max_cg):
        live = res > target
        if not bool(live.any()):
            break
        hW, hb = hvp(dW, db)
        alpha = torch.where(live, rz / _dot(dW, hW, db, hb).clamp_min(1e-300), torch.zeros_like(rz))
        sW = sW + alpha[:, None, None] * dW
        sb = sb + alpha[:, None] * db
        rW = rW - alpha[:, None, None] * hW
        rb = rb - alpha[:, None] * hb
        zW, zb = mW * rW, mb * rb
        rz_new = _dot(rW, zW, rb, zb)
        beta = rz_new / rz.clamp_min(1e-300)
        dW = zW + beta[:, None, None] * dW
        db = zb + beta[:, None] * db
        rz = rz_new
        res = _dot(rW, rW, rb, rb)
    return sW, sb


def _line_search(x: torch.Tensor, y1h: torch.Tensor, C: float, W: torch.Tensor, b: torch.Tensor, f: torch.Tensor,
                 gW: torch.Tensor, gb: torch.Tensor, sW: torch.Tensor,
                 sb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Armijo backtracking along s, per episode: the new (W, b) and which episodes took a step (an episode
    that no step improves has converged to rounding)."""
    slope = _dot(gW, sW, gb, sb)
    t = x.new_ones(W.shape[0])
    done = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
    newW, newb = W, b
    for _ in range(30):
        cW = W + t[:, None, None] * sW
        cb = b + t[:, None] * sb
        _, cf = _lr_objective(x, y1h, C, cW, cb)
        # near the optimum the decrease falls below f's rounding: the (precise) Newton step is taken
        ok = ((cf <= f + 1e-4 * t * slope) | (-slope <= 1e-13 * f.abs().clamp_min(1.0))) & ~done
        newW = torch.where(ok[:, None, None], cW, newW)
        newb = torch.where(ok[:, None], cb, newb)
        done = done | ok
        if bool(done.all()):
            break
        t = torch.where(done, t, t * 0.5)
    return newW, newb, done


def logistic_regression_batched(sx: torch.Tensor, sy: torch.Tensor, n_classes: int, C: float = 1.0,
                                tol: float = 1e-8, max_iter: int = 100,
                                max_cg: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression of E episodes at once; returns (W (E, K, D), b (E, K)).

    Minimises scikit-learn's objective (``LogisticRegression(C=C)``, multinomial, L2 on the weights only,
    unpenalised intercept), per episode: ``C * sum_i CE(softmax(W x_i + b), y_i) + 0.5 * ||W||^2``, in
    float64, by Newton's method: each Newton system is solved by Jacobi-preconditioned conjugate gradients
    on Hessian-vector products (two batched matrix products each, no factorisation: `_newton_direction`),
    then an Armijo backtracking line search (`_line_search`); an episode stops when the max-norm of its
    gradient is below ``tol`` (or when no step decreases its objective in floating point). The objective is
    strictly convex in W, and in b up to a common shift of b (which changes no prediction), so this is the
    optimum scikit-learn's lbfgs approaches (scikit-learn stops earlier, at its own tolerance).
    """
    x_all = sx.to(torch.float64)
    E = x_all.shape[0]
    K = int(n_classes)
    y_all = torch.nn.functional.one_hot(sy.long(), K).to(x_all.dtype)
    x2_all = x_all * x_all
    W_all = x_all.new_zeros(E, K, x_all.shape[2])
    b_all = x_all.new_zeros(E, K)
    active = torch.arange(E, device=x_all.device)
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        every = active.numel() == E
        x = x_all if every else x_all[active]
        y1h = y_all if every else y_all[active]
        W, b = (W_all, b_all) if every else (W_all[active], b_all[active])
        p, f = _lr_objective(x, y1h, C, W, b)
        r = C * (p - y1h)                                          # (e, n, K)
        gW = torch.bmm(r.transpose(1, 2), x) + W
        gb = r.sum(1)
        going = torch.maximum(gW.abs().amax((1, 2)), gb.abs().amax(1)) > tol
        if not bool(going.all()):
            active = active[going]
            continue  # recompute on the episodes that still move
        sW, sb = _newton_direction(x, x2_all if every else x2_all[active], p, gW, gb, C, max_cg)
        newW, newb, done = _line_search(x, y1h, C, W, b, f, gW, gb, sW, sb)
        W_all[active] = newW
        b_all[active] = newb
        active = active[done]
    return W_all, b_all


def _one_hot_means(sx: torch.Tensor, sy: torch.Tensor, n_classes: int) -> torch.Tensor:
    y1h = torch.nn.functional.one_hot(sy.long(), n_classes).to(sx.dtype)     # (E, n, K)
    return torch.bmm(y1h.transpose(1, 2), sx) / y1h.sum(1).clamp_min(1)[:, :, None]


def _sq_dist(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (q * q).sum(2)[:, :, None] - 2.0 * torch.bmm(q, s.transpose(1, 2)) + (s * s).sum(2)[:, None, :]


def predict_batched(classifier: str, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, n_classes: int,
                    C: float = 1.0, proto_rule: str = "mean", n_aug: int = 1,
                    refit_margin: float = 1e-4) -> torch.Tensor:
    """Predicted labels (E, m) of E episodes of the same shape: supports ``sx`` (E, n, D) with labels ``sy``
    (E, n) in 0..n_classes-1, queries ``qx`` (E, m, D). LR / NN / Cosine / Proto in torch float64; SVM
    falls back to scikit-learn episode by episode. LR episodes with a query closer than ``refit_margin``
    to a tie (in logits) are refitted with scikit-learn (0 turns this off)."""
    name = canonical_classifier(classifier)
    sx, qx = sx.to(torch.float64), qx.to(torch.float64)
    sy = sy.long()
    if name == "LR":
        W, b = logistic_regression_batched(sx, sy, n_classes, C=C)
        logits = torch.baddbmm(b[:, None, :], qx, W.transpose(1, 2))
        pred = logits.argmax(2)
        if n_classes > 1 and refit_margin > 0:
            # A query whose two best logits differ by less than refit_margin is decided by where lbfgs stops
            # (scikit-learn stops at its tolerance, before the optimum): such episodes (degenerate features,
            # e.g. an untrained network) are refitted with the reference so the numbers are its numbers.
            top2 = logits.topk(2, dim=2).values
            close = ((top2[:, :, 0] - top2[:, :, 1]) < refit_margin).any(1).nonzero().flatten().tolist()
            if close:
                sxn, syn, qxn = sx[close].cpu().numpy(), sy[close].cpu().numpy(), qx[close].cpu().numpy()
                ref = np.stack([_logistic_regression(sxn[i], syn[i], qxn[i], C=C) for i in range(len(close))])
                pred[close] = torch.as_tensor(ref, device=pred.device).long()
        return pred
    if name == "NN":
        return torch.gather(sy, 1, _sq_dist(qx, sx).argmin(2))
    if name == "Cosine":
        def unit(a):
            return a / torch.linalg.vector_norm(a, dim=2, keepdim=True).clamp_min(1e-12)
        return torch.gather(sy, 1, torch.bmm(unit(qx), unit(sx).transpose(1, 2)).argmax(2))
    if name == "Proto":
        if proto_rule == "rfs" and n_aug > 1:
            copies, blocks = _rfs_blocks(sx.shape[1], qx.shape[1], n_aug)
            return torch.cat([predict_batched("Proto", sx[:, c], sy[:, c], qx[:, q], n_classes)
                              for c, q in zip(copies, blocks)], dim=1)
        return _sq_dist(qx, _one_hot_means(sx, sy, n_classes)).argmin(2)
    # SVM: scikit-learn, one episode at a time
    sxn, syn, qxn = sx.cpu().numpy(), sy.cpu().numpy(), qx.cpu().numpy()
    preds = [np.asarray(_svm(sxn[e], syn[e], qxn[e])) for e in range(sxn.shape[0])]
    return torch.as_tensor(np.stack(preds), device=sx.device).long()


def predict_episodes(classifier: str, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, n_classes: int,
                     backend: str = "torch", C: float = 1.0, proto_rule: str = "mean",
                     n_aug: int = 1, refit_margin: float = 1e-4) -> torch.Tensor:
    """Predicted labels (E, m) with the chosen back end: ``torch`` (batched) or ``sklearn`` (the reference,
    one episode at a time, numpy)."""
    if backend == "torch":
        return predict_batched(classifier, sx, sy, qx, n_classes, C=C, proto_rule=proto_rule, n_aug=n_aug,
                               refit_margin=refit_margin)
    if backend != "sklearn":
        raise UsageError(f"unknown few-shot back end {backend!r}; use one of {', '.join(BACKENDS)}")
    fit_predict = get_classifier(classifier)
    sxn = sx.to(torch.float64).cpu().numpy()
    qxn = qx.to(torch.float64).cpu().numpy()
    syn = sy.cpu().numpy()
    preds = [np.asarray(fit_predict(sxn[e], syn[e], qxn[e], C=C, proto_rule=proto_rule, n_aug=n_aug))
             for e in range(sxn.shape[0])]
    return torch.as_tensor(np.stack(preds)).long()


__all__ = [
    "BACKENDS", "CLASSIFIERS", "PROTO_RULES", "canonical_classifier", "get_classifier", "l2_normalize",
    "logistic_regression_batched", "predict_batched", "predict_episodes",
]
