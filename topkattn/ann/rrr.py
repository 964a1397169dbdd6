"""Per-cluster reduced-rank regression (the LoRANN score model).

Shape letters (the ANN index's own): Qt training queries, N points of the cluster, Dx data
dim, Dg reduced (global) dim, Rk rank.

For a cluster with points P (N, Dx) and reduced training queries X (Qt, Dg), the
targets are the inner products Y = Q P^T (Qt, N).  The OLS coefficient beta (Dg, N)
is P T (approximate mode, exact when T is square) or the least-squares solution
of X beta = Y.  Reduced-rank regression keeps the fitted values' top-Rk right
singular vectors V (N, Rk): W = beta V V^T, factored as A = beta V (Dg, Rk) and
B = V^T (Rk, N), so a reduced query x scores every point at once as (x A) B.

The right singular vectors of Y_hat = X beta are those of M = S^1/2 U^T beta
(Dg, N), where X^T X = U S U^T: only the (Dg, Dg) Gram of the training queries is
needed, never the (Qt, N) matrix Y_hat.
"""
import numpy as np


def gram_sqrt(gram):
    """Return F (Dg, Dg) with F^T F = gram (symmetric PSD): the Cholesky factor L^T (10x
    cheaper than an eigendecomposition), or sqrt(w) U^T from one when gram is singular."""
    gram = np.asarray(gram, np.float64)
    try:
        return np.linalg.cholesky(gram).T
    except np.linalg.LinAlgError:  # not positive definite (fewer queries than dimensions)
        w, u = np.linalg.eigh(gram)
        w = np.clip(w, 0.0, None)
        return np.sqrt(w)[:, None] * u.T


def fit_cluster(beta, gram, rank):
    """Fit the rank-``rank`` model of one cluster.

    beta: (Dg, N) OLS coefficients; gram: (Dg, Dg) Gram of the reduced training queries.
    Returns ``(A, Bt, P)``: A (Dg, Rk) float64, Bt = B^T (N, Rk) float64, and
    P (Rk, Dg), the map that places a new point with OLS column b as ``P b``: the
    column minimising the squared score error over the training queries,
    P = (A^T Gram A)^+ A^T Gram (for a training point it returns that point's
    column of B exactly).  Columns past the numerical rank of the fitted values
    (at most min(rank, Dg, N)) are zero.

    The right singular vectors come from the (Dg, Dg) eigenproblem of M M^T with
    M = F beta, F^T F = Gram: V = M^T U / s, so A^T Gram A = diag(s^2).
    """
    beta = np.asarray(beta, np.float64)
    g, n = beta.shape
    gram = np.asarray(gram, np.float64)
    m = gram_sqrt(gram) @ beta  # (Dg, N)
    w, u = np.linalg.eigh(m @ m.T)  # ascending, (Dg,), (Dg, Dg)
    w, u = w[::-1], u[:, ::-1]
    keep = min(rank, g, n)
    tol = max(w[0], 0.0) * 1e-10 if g else 0.0
    r_eff = int(np.sum(w[:keep] > tol)) if keep else 0
    s = np.sqrt(w[:r_eff])  # (r_eff,)
    v = (m.T @ u[:, :r_eff]) / s  # (N, r_eff) orthonormal columns
    a = beta @ v  # (Dg, r_eff)
    p = (a.T @ gram) / (s * s)[:, None]  # (r_eff, Dg)
    A = np.zeros((g, rank))
    Bt = np.zeros((n, rank))
    P = np.zeros((rank, g))
    A[:, :r_eff] = a
    Bt[:, :r_eff] = v
    P[:r_eff] = p
    return A, Bt, P


def ols_beta(points_red, points, transform, query_gram_full, gram, approximate):
    """OLS coefficients beta (Dg, N) of one cluster.

    points_red: (N, Dg) reduced points; points: (N, Dx); transform: (Dx, Dg) or None;
    query_gram_full: (Dx, Dx) Gram of the raw training queries (used when not
    approximate and the dimension is reduced); gram: (Dg, Dg) = T^T Q^T Q T.
    """
    if approximate or transform is None:
        return points_red.T.astype(np.float64)
    rhs = transform.T.astype(np.float64) @ query_gram_full @ points.T.astype(np.float64)  # (Dg, N)
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]
