"""WebDataset data layer: shard writers with ``index.json``, offline datasets, and an exactly-once loader for images,
point clouds, audio and video.

Write::

    from mmblocks.data import make_dataset, write_from_folder
    make_dataset("textures", "data/textures")                     # or digits, meshes, keywords, moving-digits
    write_from_folder("photos/", "data/photos", split="train")    # photos/<class>/<image>

Read::

    from mmblocks.data import build_loader
    loader = build_loader("data/textures", "train", batch_size=64, image_size=32, num_workers=2)
    for batch in loader:  # Batch(inputs [B, 3, 32, 32] float32, label [B] int64, key list[str], mask, extra)
        ...
    build_loader("data/meshes", "train", batch_size=32, num_points=512)   # inputs [B, P, 3], mask [B, P] or None
    build_loader("data/keywords", "train", batch_size=64)                 # waveforms [B, S], mask [B, S]
    build_loader("data/moving-digits", "train", batch_size=8, motion_vectors=True)  # [B, T, 3, H, W], extra["motion"]
"""

from .codecs import (
    CODECS,
    AudioCodec,
    ImageCodec,
    PointsCodec,
    SampleCodec,
    VideoCodec,
    create_codec,
    list_codecs,
    pad_stack,
    register_codec,
)
from .datasets import TEXTURE_PHOTOS, digits_splits, make_digits, make_textures, texture_splits
from .keywords import ENGLISH_VOICES, KEYWORDS, VARIANTS, EspeakNotFoundError, keyword_voice_splits, make_keywords
from .loader import (
    LOSS_CAUSES,
    Batch,
    MissingKeyError,
    ShardDataset,
    ShardLoader,
    ShardSource,
    build_loader,
    resolve_shards,
)
from .meshes import MESH_CATEGORIES, make_meshes
from .moving_digits import DIRECTIONS, make_moving_digit_captions, make_moving_digits
from .registry import DATASETS, list_datasets, make_dataset, register_dataset
from .schema import (
    FORMAT_VERSION,
    IMAGE_KEYS,
    INDEX_NAME,
    MODALITY_KEYS,
    DatasetIndex,
    ShardIndexError,
    ShardInfo,
    SplitInfo,
    read_index,
)
from .sentences import make_sentences
from .shapes import make_shapes
from .shards import (
    FILE_EXTENSIONS,
    ShardWriteError,
    parse_size,
    write_from_folder,
    write_from_manifest,
    write_shards,
)
from .tario import TarReadError, iter_samples
from .transforms import (
    BatchNormalizer,
    ImageDecoder,
    ToNormalizedTensor,
    build_geometry,
    build_transform,
    default_mean_std,
)

__all__ = [
    "LOSS_CAUSES",
    "CODECS",
    "AudioCodec",
    "ImageCodec",
    "PointsCodec",
    "SampleCodec",
    "VideoCodec",
    "pad_stack",
    "create_codec",
    "list_codecs",
    "list_datasets",
    "register_codec",
    "register_dataset",
    "make_shapes",
    "make_sentences",
    "make_moving_digit_captions",
    "DATASETS",
    "DIRECTIONS",
    "ENGLISH_VOICES",
    "FILE_EXTENSIONS",
    "KEYWORDS",
    "MESH_CATEGORIES",
    "VARIANTS",
    "EspeakNotFoundError",
    "FORMAT_VERSION",
    "IMAGE_KEYS",
    "INDEX_NAME",
    "MODALITY_KEYS",
    "TEXTURE_PHOTOS",
    "Batch",
    "BatchNormalizer",
    "DatasetIndex",
    "ImageDecoder",
    "MissingKeyError",
    "ShardDataset",
    "ShardIndexError",
    "ShardInfo",
    "ShardLoader",
    "ShardSource",
    "ShardWriteError",
    "SplitInfo",
    "TarReadError",
    "ToNormalizedTensor",
    "build_geometry",
    "build_loader",
    "build_transform",
    "default_mean_std",
    "digits_splits",
    "iter_samples",
    "keyword_voice_splits",
    "make_dataset",
    "make_digits",
    "make_keywords",
    "make_meshes",
    "make_moving_digits",
    "make_textures",
    "parse_size",
    "read_index",
    "resolve_shards",
    "texture_splits",
    "write_from_folder",
    "write_from_manifest",
    "write_shards",
]
