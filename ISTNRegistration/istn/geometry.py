"""Explicit image geometry: voxel, normalised and world coordinates.

Three coordinate systems appear in this engine and every matrix says which
one it maps between:

- voxel: continuous ITK index ``(i, j[, k])``, voxel centres at integers;
- normalised: per-axis ``[-1, 1]`` over the voxel centres, the convention of
  ``torch.nn.functional.grid_sample(..., align_corners=True)``; component order
  ``(x, y[, z])`` equals the ITK index order ``(i, j[, k])``;
- world: physical millimetres in ITK's LPS frame,
  ``world = origin + direction @ diag(spacing) @ voxel``.

All matrices are homogeneous ``(D+1, D+1)`` float64 numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Grid:
    """A sampling grid in physical space (the geometry of an ITK image).

    ``size`` and ``spacing`` are in ITK order ``(X, Y[, Z])``; the numpy/torch
    array of such an image has shape ``(Z, Y, X)``.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major D*D, as sitk.Image.GetDirection()

    def __post_init__(self) -> None:
        d = len(self.size)
        if d not in (2, 3):
            raise ValueError(f"Grid() 'size' must have 2 or 3 entries, got {self.size}")
        if len(self.spacing) != d or len(self.origin) != d or len(self.direction) != d * d:
            raise ValueError("Grid() 'spacing', 'origin' and 'direction' must match the dimension of 'size'")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"Grid() 'spacing' must be positive, got {self.spacing}")

    # -- construction -------------------------------------------------------
    @classmethod
    def from_image(cls, image: sitk.Image) -> "Grid":
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(c) for c in image.GetDirection()),
        )

    @classmethod
    def centred_on(cls, grid: "Grid", size: tuple[int, ...], spacing: float | tuple[float, ...]) -> "Grid":
        """A grid of ``size`` voxels of ``spacing`` mm with ``grid``'s direction and centre."""
        if len(size) != grid.ndim:
            raise ValueError(f"Grid.centred_on() 'size' must have {grid.ndim} entries, got {size}")
        return cls.centred_at(grid.centre, size, spacing, grid.direction_matrix)

    @classmethod
    def centred_at(cls, centre: np.ndarray, size: tuple[int, ...], spacing: float | tuple[float, ...],
                   direction: np.ndarray | None = None) -> "Grid":
        """A grid of ``size`` voxels of ``spacing`` mm whose centre is the world point ``centre``.

        ``direction`` ``(D, D)`` defaults to the identity: axes along the world
        (LPS) axes, the patient frame of the network's internal grids.
        """
        c = np.asarray(centre, dtype=float)
        d = c.size
        if len(size) != d:
            raise ValueError(f"Grid.centred_at() 'size' must have {d} entries, got {size}")
        sp = np.broadcast_to(np.asarray(spacing, dtype=float), (d,))
        dm = np.eye(d) if direction is None else np.asarray(direction, dtype=float).reshape(d, d)
        origin = c - dm @ (sp * (np.asarray(size) - 1) / 2.0)
        return cls(tuple(int(s) for s in size), tuple(float(s) for s in sp), tuple(origin.tolist()),
                   tuple(dm.ravel().tolist()))

    # -- properties ---------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape ``(Z, Y, X)`` / ``(Y, X)`` of an image on this grid."""
        return tuple(reversed(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(self.ndim, self.ndim)

    @property
    def centre(self) -> np.ndarray:
        """World position of the grid centre, ``(D,)``."""
        return self.voxel_to_world(np.asarray([(s - 1) / 2.0 for s in self.size]))

    # -- matrices -----------------------------------------------------------
    def voxel_to_world_matrix(self) -> np.ndarray:
        d = self.ndim
        m = np.eye(d + 1)
        m[:d, :d] = self.direction_matrix @ np.diag(self.spacing)
        m[:d, d] = self.origin
        return m

    def world_to_voxel_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.voxel_to_world_matrix())

    def normalised_to_voxel_matrix(self) -> np.ndarray:
        """``voxel = (n + 1) * (size - 1) / 2`` (align_corners=True)."""
        d = self.ndim
        half = np.asarray([(s - 1) / 2.0 for s in self.size])
        m = np.eye(d + 1)
        m[:d, :d] = np.diag(half)
        m[:d, d] = half
        return m

    def normalised_to_world_matrix(self) -> np.ndarray:
        return self.voxel_to_world_matrix() @ self.normalised_to_voxel_matrix()

    def world_to_normalised_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.normalised_to_world_matrix())

    # -- points -------------------------------------------------------------
    def voxel_to_world(self, points: np.ndarray) -> np.ndarray:
        """``(..., D)`` voxel indices -> ``(..., D)`` world mm."""
        return apply_homogeneous(self.voxel_to_world_matrix(), points)

    def world_to_voxel(self, points: np.ndarray) -> np.ndarray:
        return apply_homogeneous(self.world_to_voxel_matrix(), points)

    def world_points(self) -> np.ndarray:
        """World coordinates of every voxel centre, array-ordered ``(*shape, D)``."""
        idx = np.meshgrid(*[np.arange(s) for s in self.shape], indexing="ij")
        voxel = np.stack(idx[::-1], axis=-1).astype(float)  # (..., i, j, k) order
        return self.voxel_to_world(voxel)

    # -- SimpleITK ----------------------------------------------------------
    def reference_image(self, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
        """An empty image with this geometry (a resampling reference)."""
        img = sitk.Image(list(self.size), pixel_type)
        self.apply_to(img)
        return img

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def image_from_array(self, array: np.ndarray) -> sitk.Image:
        """Array ``(*shape)`` or ``(*shape, C)`` -> image with this geometry."""
        vector = array.ndim == self.ndim + 1
        img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=vector)
        return self.apply_to(img)


def _lps_order(grid: Grid) -> tuple[list[int], list[bool], np.ndarray]:
    """How ``grid``'s voxels are re-stored along the axes nearest L, P, S (3D; in 2D the world x, y axes): for
    each new axis the stored axis it is, whether it runs the other way, and the new direction matrix.

    3D: as ``sitk.DICOMOrient(image, "LPS")`` does it (ITK orients a 2 x 2 x 2 image of the same direction). 2D
    (which DICOMOrient does not take): the stored axis running most along x first, each axis turned to run
    along +x, +y."""
    d = grid.direction_matrix
    if grid.ndim == 3:
        proxy = sitk.Image([2, 2, 2], sitk.sitkUInt8)
        proxy.SetDirection(grid.direction)
        lps = np.reshape(sitk.DICOMOrient(proxy, "LPS").GetDirection(), (3, 3))
        match = d.T @ lps  # [i, j]: +-1 where new axis j is stored axis i
        axes = [int(i) for i in np.argmax(np.abs(match), axis=0)]
        return axes, [bool(match[i, j] < 0) for j, i in enumerate(axes)], lps
    first = int(np.argmax(np.abs(d[0])))
    axes = [first, 1 - first]
    flips = [bool(d[j, i] < 0) for j, i in enumerate(axes)]
    return axes, flips, d[:, axes] * np.where(flips, -1.0, 1.0)


def lps_grid(grid: Grid) -> Grid:
    """The grid ``sitk.DICOMOrient(image, "LPS")`` would give an image of ``grid`` (`stored_lps`), without making its
    voxels: the same voxels, stored along the axes nearest L, P, S (2D: x, y). The axes permuted and flipped
    (`_lps_order`) are carried over to the size, spacing and first voxel."""
    axes, flips, direction = _lps_order(grid)
    first = np.zeros(grid.ndim)  # the stored index of the re-stored first voxel
    for i, flip in zip(axes, flips):
        first[i] = grid.size[i] - 1 if flip else 0
    return Grid(tuple(int(grid.size[i]) for i in axes), tuple(float(grid.spacing[i]) for i in axes),
                tuple(float(v) for v in grid.voxel_to_world(first)), tuple(direction.ravel().tolist()))


def stored_lps(image: sitk.Image) -> sitk.Image:
    """``image`` with its voxels stored along the axes nearest L, P, S (`lps_grid`; 2D: x, y; exact: a permutation
    and flips of its axes, the same world content), or ``image`` itself where it is stored so already.

    What is sampled from an image must not depend on how its file orders the voxels, and ITK's resampling does
    where a point falls exactly on a voxel boundary: nearest neighbour breaks a tie (half-way between two
    voxels: a 2 mm grid at whole millimetres sampling a 1 mm one at half millimetres hits one on every axis)
    towards the higher stored index, and a point on the face half a voxel beyond the last voxel is inside,
    beyond the first one outside. On the image as stored LPS both fall the same way whatever the storage."""
    grid = Grid.from_image(image)
    target = lps_grid(grid)
    if target == grid:
        return image
    if image.GetDimension() == 3:
        return sitk.DICOMOrient(image, "LPS")
    axes, flips, _ = _lps_order(grid)
    array = sitk.GetArrayFromImage(image)  # (y, x[, components]): stored axis i is array axis 1 - i
    if axes[0] != 0:
        array = np.swapaxes(array, 0, 1)
    for j, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis=1 - j)
    out = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=image.GetNumberOfComponentsPerPixel() > 1)
    target.apply_to(out)
    return out


def stored_as(on_lps: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """An image on ``lps_grid`` of ``reference``'s grid, its voxels stored as ``reference``'s are (the inverse of
    `stored_lps`: exact), with ``reference``'s geometry."""
    grid = Grid.from_image(reference)
    if on_lps.GetDimension() == 3:
        stored = sitk.DICOMOrient(on_lps, sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            reference.GetDirection()))
    else:
        axes, flips, _ = _lps_order(grid)
        array = sitk.GetArrayFromImage(on_lps)
        for j, flip in enumerate(flips):
            if flip:
                array = np.flip(array, axis=1 - j)
        if axes[0] != 0:
            array = np.swapaxes(array, 0, 1)
        stored = sitk.GetImageFromArray(np.ascontiguousarray(array),
                                        isVector=on_lps.GetNumberOfComponentsPerPixel() > 1)
    # DICOMOrient's own origin, where it has one, must be the reference's (ours in 2D is the reference's by design)
    if stored.GetSize() != reference.GetSize() or (stored.GetDimension() == 3 and not np.allclose(
            stored.GetOrigin(), reference.GetOrigin(), atol=1e-4 * max(reference.GetSpacing()))):
        raise RuntimeError("internal: an image on the LPS-stored grid could not be stored as the reference is")
    stored.CopyInformation(reference)
    return stored


def field_lattice(reference: Grid, spacing: float) -> Grid:
    """A lattice over ``reference``'s field of view about every ``spacing`` mm, laid on the reference as stored LPS
    (`lps_grid`: a reference stored RAS, sagittal or oblique, or a 2D one flipped, gets the same lattice, so what is
    sampled on it does not depend on the storage): its origin and direction, per axis a whole multiple ``k =
    round(spacing / reference spacing)`` (at least 1) of its spacing (every reference voxel lies on the lattice's
    lines) and enough points to cover its last voxel."""
    reference = lps_grid(reference)
    k = [max(1, int(round(spacing / s))) for s in reference.spacing]
    size = tuple((n - 1 + kk - 1) // kk + 1 for n, kk in zip(reference.size, k))
    return Grid(size=size, spacing=tuple(kk * s for kk, s in zip(k, reference.spacing)), origin=reference.origin,
                direction=reference.direction)


def apply_homogeneous(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a ``(D+1, D+1)`` homogeneous matrix to ``(..., D)`` points."""
    d = matrix.shape[0] - 1
    pts = np.asarray(points, dtype=float)
    return pts @ matrix[:d, :d].T + matrix[:d, d]


def resample_to_grid(
    image: sitk.Image,
    grid: Grid,
    transform: sitk.Transform | None = None,
    interpolator: int = sitk.sitkLinear,
    default: float = 0.0,
) -> sitk.Image:
    """Resample ``image`` onto ``grid``; ``transform`` maps grid (world) points to image points."""
    tx = transform if transform is not None else sitk.Transform(grid.ndim, sitk.sitkIdentity)
    return sitk.Resample(image, grid.reference_image(), tx, interpolator, default, image.GetPixelID())
