"""Smooth random shapes and fields defined in world coordinates (mm), rendered on any voxel grid.

Anatomy is described once in world space (RAS+, mm) and evaluated at the voxel centres of each
acquisition grid, so every modality is rendered directly on its own grid with its true geometry,
with no resampling between grids. Shapes give an approximate signed distance in mm (negative
inside); :func:`fraction` turns it into a partial-volume fraction over about one voxel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


def rotation_matrix(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """3x3 rotation by ``angle_deg`` about ``axis`` (Rodrigues' formula, right-handed)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    a = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


def grid_affine(
    shape: Sequence[int], spacing: Sequence[float], directions: np.ndarray, center: Sequence[float]
) -> np.ndarray:
    """4x4 voxel-to-world affine of a grid whose centre (middle of the FOV) lies at ``center``.

    Args:
        shape: (nx, ny, nz) voxels.
        spacing: (sx, sy, sz) mm.
        directions: 3x3, columns are the unit world directions of the i, j, k axes.
        center: world position (mm) of the grid centre.
    """
    shape, spacing = np.asarray(shape, float), np.asarray(spacing, float)
    A = np.eye(4)
    A[:3, :3] = np.asarray(directions, float) @ np.diag(spacing)
    A[:3, 3] = np.asarray(center, float) - A[:3, :3] @ ((shape - 1) / 2.0)
    return A


def world_points(affine: np.ndarray, shape: Sequence[int], k: int | slice | None = None) -> np.ndarray:
    """World coordinates (mm) of voxel centres, shape ``(nx*ny*nz', 3)`` in C order (x slowest).

    Args:
        affine: 4x4 voxel-to-world affine.
        shape: grid shape (nx, ny, nz).
        k: restrict to one slice index or a slice range of the third axis.
    """
    nx, ny, nz = (int(s) for s in shape)
    ks = np.arange(nz)[k] if k is not None else np.arange(nz)
    ks = np.atleast_1d(ks)
    ii, jj, kk = np.meshgrid(np.arange(nx), np.arange(ny), ks, indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(np.float64)
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def small_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for a tall ``a`` (N, k) and a tiny ``b`` (k, m) or (k,), as k broadcast multiply-adds
    (BLAS is slow and thread-hungry for such shapes)."""
    b = np.asarray(b, dtype=a.dtype)
    out = a[:, 0:1] * b[0] if b.ndim == 2 else a[:, 0] * b[0]
    for i in range(1, a.shape[1]):
        out += a[:, i : i + 1] * b[i] if b.ndim == 2 else a[:, i] * b[i]
    return out


def fraction(distance_mm: np.ndarray, width_mm: float) -> np.ndarray:
    """Partial-volume fraction inside a shape from its signed distance (negative inside).

    A linear ramp from 1 (``d <= -width/2``) to 0 (``d >= width/2``): the box-filter of a plane
    boundary over one voxel of size ``width_mm``.
    """
    return np.clip(0.5 - distance_mm / max(width_mm, 1e-6), 0.0, 1.0).astype(np.float32)


@dataclass
class Ellipsoid:
    """Ellipsoid with smooth random surface bumps.

    Attributes:
        center: world centre (mm), (3,).
        radii: semi-axes (mm), (3,), along the columns of ``rotation``.
        rotation: 3x3 world-from-local rotation.
        bumps: ``(K, 4)``: rows ``(wx, wy, wz, amplitude)`` with phases in ``phases``; the radius
            along unit direction ``u`` is scaled by ``1 + sum_k a_k sin(w_k . u + phi_k)``.
        phases: (K,) radians.
    """

    center: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    bumps: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    phases: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm, negative inside) of ``points`` (N, 3): the distance to
        the surface along the ray from the centre."""
        pts = np.asarray(points)
        dt = pts.dtype if pts.dtype in (np.float32, np.float64) else np.float64
        local = small_matmul(pts - self.center.astype(dt), self.rotation)  # (N, 3) local coordinates
        return self._from_local(local, dt)

    def distance_grid(self, base: np.ndarray, ax_i: np.ndarray, ax_j: np.ndarray) -> np.ndarray:
        """:meth:`distance` at the points ``base + ax_i[a] + ax_j[b]`` (a slab of a voxel grid),
        flattened in C order (a slowest); ``ax_i`` (ni, 3), ``ax_j`` (nj, 3), float32."""
        dt = np.float32
        li = small_matmul(np.asarray(ax_i, dt), self.rotation)
        lj = small_matmul(np.asarray(ax_j, dt), self.rotation)
        l0 = ((np.asarray(base, float) - self.center) @ self.rotation).astype(dt)
        local = (li[:, None, :] + lj[None, :, :] + l0).reshape(-1, 3)
        return self._from_local(local, dt)

    def _from_local(self, local: np.ndarray, dt) -> np.ndarray:
        scaled = local / self.radii.astype(dt)
        r = np.sqrt(np.einsum("ij,ij->i", scaled, scaled))
        dist = np.sqrt(np.einsum("ij,ij->i", local, local))
        r_safe = np.maximum(r, 1e-6)
        if len(self.bumps):
            u = scaled / r_safe[:, None]
            scale = 1.0 + small_matmul(
                np.sin(small_matmul(u, self.bumps[:, :3].T) + self.phases.astype(dt)), self.bumps[:, 3]
            )
        else:
            scale = 1.0
        d = dist * (1.0 - scale / r_safe)
        return np.where(r > 1e-6, d, -np.min(self.radii) * np.ones_like(d))

    def extent(self, direction: np.ndarray) -> float:
        """Half-width (mm) of the shape's bounding slab along the unit vector ``direction``."""
        proj = self.rotation.T @ np.asarray(direction, float)
        bump = 1.0 + (np.abs(self.bumps[:, 3]).sum() if len(self.bumps) else 0.0)
        return float(np.sqrt(np.sum((self.radii * proj) ** 2)) * bump)

    def extent_max(self) -> float:
        """Radius (mm) of a sphere about the centre that contains the shape."""
        bump = 1.0 + (np.abs(self.bumps[:, 3]).sum() if len(self.bumps) else 0.0)
        return float(np.max(self.radii) * bump)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean (N,): points inside."""
        return self.distance(np.atleast_2d(points)) < 0

    def describe(self) -> dict:
        """Centre and radii for a manifest."""
        return {"center_mm": self.center.round(2).tolist(), "radii_mm": self.radii.round(2).tolist()}


def random_ellipsoid(
    rng: np.random.Generator,
    center: Sequence[float],
    radii: Sequence[float],
    jitter: float = 0.1,
    bump: float = 0.06,
    n_bumps: int = 4,
    rotate_deg: float = 10.0,
) -> Ellipsoid:
    """An :class:`Ellipsoid` with radii scaled by ``1 +- jitter``, a random rotation of up to
    ``rotate_deg`` and ``n_bumps`` low-frequency surface bumps of total amplitude about ``bump``."""
    radii = np.asarray(radii, float) * (1.0 + rng.uniform(-jitter, jitter, 3))
    R = rotation_matrix(rng.normal(size=3), rng.uniform(-rotate_deg, rotate_deg))
    w = rng.normal(size=(n_bumps, 3)) * 2.0
    amp = rng.uniform(0.3, 1.0, n_bumps)
    amp = bump * amp / max(amp.sum(), 1e-9)
    return Ellipsoid(
        center=np.asarray(center, float),
        radii=radii,
        rotation=R,
        bumps=np.concatenate([w, amp[:, None]], axis=1),
        phases=rng.uniform(0, 2 * np.pi, n_bumps),
    )


@dataclass
class Tube:
    """Straight cylinder of ``radius`` mm through ``point`` along ``direction`` (infinite length)."""

    point: np.ndarray
    direction: np.ndarray
    radius: float

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Signed distance (mm) to the cylinder surface."""
        pts = np.asarray(points)
        dt = pts.dtype if pts.dtype in (np.float32, np.float64) else np.float64
        d = np.asarray(self.direction, float)
        d = (d / np.linalg.norm(d)).astype(dt)
        rel = pts - np.asarray(self.point, float).astype(dt)
        along = small_matmul(rel, d)
        perp2 = np.einsum("ij,ij->i", rel, rel) - along * along
        return np.sqrt(np.maximum(perp2, 0.0)) - dt.type(self.radius)

    def describe(self) -> dict:
        return {
            "point_mm": np.round(self.point, 2).tolist(),
            "direction": np.round(self.direction, 3).tolist(),
            "radius_mm": float(self.radius),
        }


@dataclass
class LevelSet:
    """Region where a smooth field exceeds ``threshold``, inside ``bounding``.

    The signed distance is approximated as ``(threshold - field) * length_mm`` (``length_mm`` about
    the field's wavelength over 2 pi), combined with the bounding ellipsoid's by a maximum.
    """

    field: Any
    threshold: float
    length_mm: float
    bounding: Ellipsoid

    def distance(self, points: np.ndarray) -> np.ndarray:
        d_field = (np.float32(self.threshold) - self.field(points)) * np.float32(self.length_mm)
        return np.maximum(d_field, self.bounding.distance(points))


@dataclass
class FourierField:
    """Smooth random field ``sum_j a_j cos(k_j . x + phi_j)`` in world coordinates (zero mean, unit RMS).

    Attributes:
        k: (J, 3) wave vectors in rad/mm.
        phase: (J,) radians.
    """

    k: np.ndarray
    phase: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, wavelength_mm: float, n: int = 16) -> "FourierField":
        """Wave vectors with random directions and wavelengths around ``wavelength_mm``."""
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lam = wavelength_mm * rng.uniform(0.6, 1.6, n)
        return cls(k=dirs * (2 * np.pi / lam)[:, None], phase=rng.uniform(0, 2 * np.pi, n))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Field values (N,) at ``points`` (N, 3), float32."""
        pts = np.asarray(points)
        v = np.cos(small_matmul(pts, self.k.T) + self.phase.astype(pts.dtype)).sum(axis=1)
        return (v * np.sqrt(2.0 / len(self.phase))).astype(np.float32)

    def on_grid(self, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Field values on a voxel grid, float32 ``shape`` (same values as at the voxel centres)."""
        ax = _axes(affine, shape)
        out = np.zeros(tuple(int(s) for s in shape), np.float32)
        for kv, ph in zip(self.k, self.phase):
            arg = sum((a @ kv.astype(np.float32)) for a in ax) + np.float32(ph + kv @ np.asarray(affine)[:3, 3])
            out += np.cos(arg)
        return out * np.float32(np.sqrt(2.0 / len(self.phase)))


def _axes(affine: np.ndarray, shape: Sequence[int]) -> list[np.ndarray]:
    """Per-axis world offsets of a grid, broadcastable: ``[(nx,1,1,3), (1,ny,1,3), (1,1,nz,3)]`` (float32)."""
    A = np.asarray(affine, float)
    out = []
    for d, n in enumerate(shape):
        v = (np.arange(int(n))[:, None] * A[:3, d][None, :]).astype(np.float32)
        s = [1, 1, 1, 3]
        s[d] = int(n)
        out.append(v.reshape(s))
    return out


def grid_world(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World x, y, z (mm) of the voxel centres, each float32 of ``shape``."""
    ax = _axes(affine, shape)
    o = np.asarray(affine, float)[:3, 3].astype(np.float32)
    full = ax[0] + ax[1] + ax[2] + o
    return full[..., 0], full[..., 1], full[..., 2]


@dataclass
class BiasField:
    """Smooth multiplicative receive-coil bias ``exp(sum c_ab * P(x))`` (quadratic in world coordinates).

    Attributes:
        center: world centre (mm) of the normalisation.
        scale_mm: normalising length.
        coef: (9,) coefficients of x, y, z, x^2, y^2, z^2, xy, xz, yz (normalised coordinates).
    """

    center: np.ndarray
    scale_mm: float
    coef: np.ndarray

    @classmethod
    def random(
        cls, rng: np.random.Generator, center: Sequence[float], scale_mm: float, strength: float = 0.15
    ) -> "BiasField":
        """Bias of roughly ``+- strength`` over a region of size ``scale_mm``."""
        return cls(np.asarray(center, float), float(scale_mm), rng.normal(0, strength / 2, 9))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Multiplicative bias (N,) at ``points`` (N, 3), float32."""
        p = (np.asarray(points) - self.center) / self.scale_mm
        return self._poly(p[:, 0], p[:, 1], p[:, 2])

    def on_grid(self, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Bias on a voxel grid, float32 ``shape``."""
        x, y, z = grid_world(affine, shape)
        c = self.center.astype(np.float32)
        s = np.float32(self.scale_mm)
        return self._poly((x - c[0]) / s, (y - c[1]) / s, (z - c[2]) / s)

    def _poly(self, x, y, z) -> np.ndarray:
        c = self.coef.astype(np.float32)
        e = (
            c[0] * x
            + c[1] * y
            + c[2] * z
            + c[3] * x * x
            + c[4] * y * y
            + c[5] * z * z
            + c[6] * x * y
            + c[7] * x * z
            + c[8] * y * z
        )
        return np.exp(e).astype(np.float32)


@dataclass
class Scene:
    """Ordered shapes, highest priority first: ``(tissue, shape, clip_shape or None)``.

    A voxel's fraction of a tissue is its shape's fraction (clipped by ``clip``) times what the
    shapes before it left uncovered; the rest is ``background``.
    """

    items: list[tuple[str, Any, Any]]
    background: str = "air"

    def tissues(self) -> list[str]:
        """Distinct tissue names in a fixed order (background first)."""
        names = [self.background]
        for t, _, _ in self.items:
            if t not in names:
                names.append(t)
        return names


def _slice_box(shp, affine: np.ndarray, inv: np.ndarray, k: int, spacing: np.ndarray, margin: float, nx: int, ny: int):
    """In-plane index box ``(i0, i1, j0, j1)`` of slice ``k`` that can hold ``shp``; None when the
    shape misses the slice; the whole slice when the shape has no known bound."""
    dirs = affine[:3, :3] / spacing
    shp = getattr(shp, "bounding", shp)
    if isinstance(shp, Ellipsoid):
        v = inv[:3, :3] @ shp.center + inv[:3, 3]
        if abs(v[2] - k) * spacing[2] > shp.extent(dirs[:, 2]) + margin:
            return None
        ei = (shp.extent(dirs[:, 0]) + margin) / spacing[0]
        ej = (shp.extent(dirs[:, 1]) + margin) / spacing[1]
    elif isinstance(shp, Tube):
        d = np.asarray(shp.direction, float) / np.linalg.norm(shp.direction)
        n = dirs[:, 2]
        dn = abs(float(d @ n))
        if dn < 0.2:
            return 0, nx, 0, ny
        q = affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3]
        x = shp.point + ((q - shp.point) @ n) / float(d @ n) * d
        v = inv[:3, :3] @ x + inv[:3, 3]
        ext = (shp.radius + margin) / dn + (spacing[2] / 2 + margin) * np.sqrt(1 - dn * dn) / dn
        ei, ej = ext / spacing[0], ext / spacing[1]
    else:
        return 0, nx, 0, ny
    i0, i1 = max(int(np.floor(v[0] - ei)), 0), min(int(np.ceil(v[0] + ei)) + 1, nx)
    j0, j1 = max(int(np.floor(v[1] - ej)), 0), min(int(np.ceil(v[1] + ej)) + 1, ny)
    if i0 >= i1 or j0 >= j1:
        return None
    return i0, i1, j0, j1


def _distance(shp, base: np.ndarray, ax_i: np.ndarray, ax_j: np.ndarray) -> np.ndarray:
    """Signed distance of a shape on a slab of grid points ``base + ax_i[a] + ax_j[b]`` (flattened)."""
    if hasattr(shp, "distance_grid"):
        return shp.distance_grid(base, ax_i, ax_j)
    return shp.distance((ax_i[:, None, :] + ax_j[None, :, :] + base).reshape(-1, 3))


def render(
    scene: Scene, affine: np.ndarray, shape: Sequence[int], table: dict[str, np.ndarray], width_mm: float | None = None
) -> np.ndarray:
    """Fraction-weighted tissue values on a grid.

    Args:
        scene: the anatomy.
        affine: 4x4 voxel-to-world affine of the grid.
        shape: (nx, ny, nz).
        table: ``{tissue: (M,) values}`` (tissues missing from the table contribute 0).
        width_mm: partial-volume ramp width; default the geometric mean voxel size.

    Returns:
        float32 ``(nx, ny, nz, M)``.
    """
    nx, ny, nz = (int(s) for s in shape)
    affine = np.asarray(affine, float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    width = float(np.prod(spacing) ** (1 / 3)) if width_mm is None else width_mm
    names = scene.tissues()
    M = len(next(iter(table.values())))
    T = np.zeros((len(names), M), np.float32)
    for i, n in enumerate(names):
        if n in table:
            T[i] = table[n]
    index = {n: i for i, n in enumerate(names)}
    inv = np.linalg.inv(affine)
    out = np.zeros((nx, ny, nz, M), np.float32)
    ax_i = (np.arange(nx)[:, None] * affine[:3, 0]).astype(np.float32)
    ax_j = (np.arange(ny)[:, None] * affine[:3, 1]).astype(np.float32)
    for k in range(nz):
        F = np.zeros((len(names), nx, ny), np.float32)
        remaining = np.ones((nx, ny), np.float32)
        base = (affine[:3, 2] * k + affine[:3, 3]).astype(np.float32)
        for tissue, shp, clip in scene.items:
            box = _slice_box(shp, affine, inv, k, spacing, width, nx, ny)
            if box is None:
                continue
            i0, i1, j0, j1 = box
            rem = remaining[i0:i1, j0:j1]
            if not rem.any():
                continue
            w = fraction(_distance(shp, base, ax_i[i0:i1], ax_j[j0:j1]), width)
            if clip is not None:
                w = np.minimum(w, fraction(_distance(clip, base, ax_i[i0:i1], ax_j[j0:j1]), width))
            f = w.reshape(rem.shape) * rem
            F[index[tissue], i0:i1, j0:j1] += f
            remaining[i0:i1, j0:j1] = rem - f
        F[index[scene.background]] += remaining
        out[:, :, k, :] = np.einsum("kij,km->ijm", F, T)  # no BLAS threads for this small product
    return out


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise of standard deviation ``sigma`` (float32)."""
    shape = np.shape(signal)
    s = np.float32(sigma)
    re = rng.standard_normal(shape, dtype=np.float32)
    re *= s
    re += np.asarray(signal, np.float32)
    re *= re
    im = rng.standard_normal(shape, dtype=np.float32)
    im *= s
    im *= im
    re += im
    return np.sqrt(re, out=re)


MAX_SIGNAL = 4095.0  # 12-bit scanner range


def bias_texture(
    bias: BiasField, texture: FourierField, affine: np.ndarray, shape: Sequence[int], amplitude: float = 0.03
) -> np.ndarray:
    """Coil bias times within-tissue texture ``1 + amplitude * field`` on a grid, float32 ``shape``."""
    return bias.on_grid(affine, shape) * (1.0 + np.float32(amplitude) * texture.on_grid(affine, shape))


def quantise(x: np.ndarray, hi: float = MAX_SIGNAL) -> np.ndarray:
    """Round to integers in ``[0, hi]`` like scanner data (float32 holding integers)."""
    return np.clip(np.rint(x), 0, hi).astype(np.float32)
