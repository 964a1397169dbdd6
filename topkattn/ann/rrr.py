"""Per-cluster reduced-rank regression (the LoRANN score model).

Shape letters: M training queries, N points of the cluster, D data dim,
G reduced (global) dim, R rank.

For a cluster with points P (N, D) and reduced training queries X (M, G), the
targets are the inner products Y = Q P^T (M, N).  The OLS coefficient beta (G, N)
is P T (approximate mode, exact when T is square) or the least-squares solution
of X beta = Y.  Reduced-rank regression keeps the fitted values' top-R right
singular vectors V (N, R): W = beta V V^T, factored as A = beta V (G, R) and
B = V^T (R, N), so a reduced query x scores every point at once as (x A) B.

The right singular vectors of Y_hat = X beta are those of M = S^1/2 U^T beta
(G, N), where X^T X = U S U^T: only the (G, G) Gram of the training queries is
needed, never the (M, N) matrix Y_hat.
"""
import numpy as np


def gram_sqrt(gram):
    """Return F (G, G) with F^T F = gram (symmetric PSD): the Cholesky factor L^T (10x
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

    beta: (G, N) OLS coefficients; gram: (G, G) Gram of the reduced training queries.
    Returns ``(A, Bt, P)``: A (G, R) float64, Bt = B^T (N, R) float64, and
    P (R, G), the map that places a new point with OLS column b as ``P b``: the
    column minimising the squared score error over the training queries,
    P = (A^T Gram A)^+ A^T Gram (for a training point it returns that point's
    column of B exactly).  Columns past the numerical rank of the fitted values
    (at most min(rank, G, N)) are zero.

    The right singular vectors come from the (G, G) eigenproblem of M M^T with
    M = F beta, F^T F = Gram: V = M^T U / s, so A^T Gram A = diag(s^2).
    """
    beta = np.asarray(beta, np.float64)
    g, n = beta.shape
    gram = np.asarray(gram, np.float64)
    m = gram_sqrt(gram) @ beta  # (G, N)
    w, u = np.linalg.eigh(m @ m.T)  # ascending, (G,), (G, G)
    w, u = w[::-1], u[:, ::-1]
    keep = min(rank, g, n)
    tol = max(w[0], 0.0) * 1e-10 if g else 0.0
    r_eff = int(np.sum(w[:keep] > tol)) if keep else 0
    s = np.sqrt(w[:r_eff])  # (r_eff,)
    v = (m.T @ u[:, :r_eff]) / s  # (N, r_eff) orthonormal columns
    a = beta @ v  # (G, r_eff)
    p = (a.T @ gram) / (s * s)[:, None]  # (r_eff, G)
    A = np.zeros((g, rank))
    Bt = np.zeros((n, rank))
    P = np.zeros((rank, g))
    A[:, :r_eff] = a
    Bt[:, :r_eff] = v
    P[:r_eff] = p
    return A, Bt, P


def ols_beta(points_red, points, transform, query_gram_full, gram, approximate):
    """OLS coefficients beta (G, N) of one cluster.

    points_red: (N, G) reduced points; points: (N, D); transform: (D, G) or None;
    query_gram_full: (D, D) Gram of the raw training queries (used when not
    approximate and the dimension is reduced); gram: (G, G) = T^T Q^T Q T.
    """
    if approximate or transform is None:
        return points_red.T.astype(np.float64)
    rhs = transform.T.astype(np.float64) @ query_gram_full @ points.T.astype(np.float64)  # (G, N)
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]
