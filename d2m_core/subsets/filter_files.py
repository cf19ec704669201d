"""The data files DataComp's filtering baselines need, found in the weights folder like any weights.

Names and sha256 are DataComp's (baselines/utils.py `download`); WordNet is NLTK's `wordnet` corpus (the
folder or NLTK's `wordnet.zip`). A filter entry may point a file elsewhere (`data_files` in the config):
such a file is used as given and its sha256 recorded (tests train their own tiny fastText model that way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from d2m_core.compute.weights import WeightsError, WeightsFile, sha256_of, weights_dir
from d2m_core.outputs.records import WeightsRecord

ASSETS = "https://github.com/sagadre/datacomp_baseline_assets/releases/download/v0.1.0-alpha"
SCALES = ("small", "medium", "large", "xlarge")

_IN1K_SHA = ("304990fd492f40ba90072b80af78d6e8edcab9d042476ef513e03441cf53743b",
             "72f008e6aa3bfb54174fa322963215337f843fc90fd642a9dccc815dd9e7ee76",
             "83c3cc6503b8a50a22cac7023ca6cd61b130ab9725db2a7519f1bec5cabf5493",
             "83faa289f847799ddcd438e5b74df1cb5973c345674896d10ba31ea48bc63804",
             "067a45f4a140a93371876510a2fd9198a89ac1d194ae4063a51b45a6da69cadf")
_CENTROID_SHA = {"small": "23c66a05e49ad77283c1e2b33355c7eb088ac332a944c97ff85d5dfd48a5b251",
                 "medium": "028b1721b1d0f139c565b6b0ac99f8a1756f4bae89c36b0ec6d1c6ea9b6f112d",
                 "large": "04eeab1069d3540c246cf7ce69323147351a474017fc472e4c50a018ca32240b",
                 "xlarge": "3f62e5f8ae3a715ce84e422846fcfce1536d184455ea234790c4a6465c4c6726"}

# data file name -> the files it stands for (several for the ImageNet-1k embeddings)
DATA_FILES: dict[str, tuple[WeightsFile, ...]] = {
    "fasttext": (WeightsFile("lid.176.bin", "fasttext", "7e69ec5451bc261cc7844e49e4792a85d7f09c06789ec800fc4a44aec362764e",
                             "https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin"),),
    "imagenet21k_wordnet_ids": (WeightsFile("imagenet21k_wordnet_ids.txt", "text",
                                            "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2",
                                            f"{ASSETS}/imagenet21k_wordnet_ids.txt"),),
    "wordnet": (WeightsFile("wordnet.zip", "nltk-corpus", None,
                            "NLTK's wordnet corpus: `python -m nltk.downloader -d DIR wordnet`, then DIR/corpora/wordnet.zip "
                            "(or its unzipped `wordnet/` folder)"),),
    "in1k_clip_vit_l14": tuple(WeightsFile(f"in1k_clip_vit_l14_{i}.pt", "torch", sha, f"{ASSETS}/in1k_clip_vit_l14_{i}.pt")
                               for i, sha in enumerate(_IN1K_SHA)),
    **{f"{scale}_centroids": (WeightsFile(f"{scale}_centroids_l14.pt", "torch", sha, f"{ASSETS}/{scale}_centroids_l14.pt"),)
       for scale, sha in _CENTROID_SHA.items()},
}

# which data files each baseline reads (image_based: the scale's centroids are added by `files_for`)
BASELINE_FILES: dict[str, tuple[str, ...]] = {
    "no_filter": (),
    "clip_score": (),
    "laion2b": (),  # gcld3's model is inside its package
    "basic_filter": ("fasttext",),
    "text_based": ("fasttext", "imagenet21k_wordnet_ids", "wordnet"),
    "image_based": ("fasttext", "in1k_clip_vit_l14"),
    "image_based_intersect_clip_score": ("fasttext", "in1k_clip_vit_l14"),
}


@dataclass(frozen=True)
class DataFile:
    """A resolved data file: its name, local paths, sha256 of each (None for a folder) and whether pinned."""

    name: str
    paths: tuple[Path, ...]
    sha256: tuple[str | None, ...]
    pinned: bool

    @property
    def path(self) -> Path:
        return self.paths[0]

    def as_record(self) -> WeightsRecord:
        """As `d2m weights verify` prints a weights file: path, sha256, kind (official: DataComp's pin)."""
        return WeightsRecord(model=self.name, kind="official" if self.pinned else "user", path=str(self.path),
                             sha256=self.sha256[0])

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "paths": [str(p) for p in self.paths], "sha256": list(self.sha256),
                "pinned": self.pinned}


def files_for(baseline: str, image_based_scale: str | None = None) -> list[str]:
    names = list(BASELINE_FILES[baseline])
    if baseline.startswith("image_based"):
        names.append(f"{image_based_scale}_centroids")
    return names


def resolve_data_file(name: str, configured_dir: str | None = None, override: str | list[str] | None = None) -> DataFile:
    """Find and verify one data file: an override path as given, else the weights folder with DataComp's sha256."""
    if override is not None:
        paths = tuple(Path(p).expanduser() for p in ([override] if isinstance(override, str) else override))
        for path in paths:
            if not path.exists():
                raise WeightsError(f"filter data file {name}: {path} (set in data_files) does not exist")
        return DataFile(name, paths, tuple(sha256_of(p) if p.is_file() else None for p in paths), pinned=False)
    directory = weights_dir(configured_dir)
    specs = DATA_FILES[name]
    paths, digests = [], []
    for spec in specs:
        path = directory / spec.filename
        if name == "wordnet" and not path.exists() and (directory / "wordnet").is_dir():
            path = directory / "wordnet"  # NLTK's corpus unzipped
        if not path.exists():
            raise WeightsError(f"filter data file {name}: {path} not found: put {spec.filename}{' (or its folder)' if name == 'wordnet' else ''} in the weights folder "
                               f"{directory} (weights_dir / $D2M_WEIGHTS_DIR); get it from {spec.source}")
        digest = sha256_of(path) if path.is_file() else None
        if spec.sha256 is not None and digest != spec.sha256:
            raise WeightsError(f"filter data file {name}: {path} has sha256 {digest}, expected {spec.sha256}; "
                               f"download it again from {spec.source}")
        paths.append(path)
        digests.append(digest)
    return DataFile(name, tuple(paths), tuple(digests), pinned=True)


def data_files_inventory(configured_dir: str | None = None) -> list[dict[str, str | None]]:
    """Rows for `d2m weights`: every data file the filters may read."""
    directory = weights_dir(configured_dir)
    users = {name: [b for b, files in BASELINE_FILES.items() if name in files] for name in DATA_FILES}
    for scale in SCALES:
        users[f"{scale}_centroids"] = [f"image_based* (--image_based_scale {scale})"]
    return [{"model": f"filter data: {name} (used by {', '.join(users[name])})", "file": spec.filename,
             "format": spec.format, "sha256": spec.sha256, "path": str(directory / spec.filename), "source": spec.source}
            for name, specs in DATA_FILES.items() for spec in specs]
