"""Detokenizer throughput against its tokenizer, and against a reference implementation where one exists, in one run.

Rows (forward only, inference mode, median of interleaved repeats):
- pixels: `ImagePatches` (the tokenizer) vs our MAE decoder (`pixels`, all patches decoded) vs HF `ViTMAEDecoder`
  with the same weights (the reference; outputs checked equal first);
- points: `PointGroups` vs the Point-MAE decoder (`points`); Chamfer-L2 of its predictions vs a brute-force
  `torch.cdist` reference (checked equal);
- waveform: `AudioPatches` (Kaldi fbank + patches) vs the fbank-patch decoder (`waveform`) vs Griffin-Lim rendering of
  the fbank (`GriffinLimVocoder`, Kaldi banks), and torchaudio's `InverseMelScale` + `GriffinLim` vs our `mel` kind
  (the same modules: the ratio is the wrapper's overhead);
- motion: `MotionTokens` vs the motion decoder (`motion`) vs rendering the clip (`warp_clip`).
The ratio column is each row's time over its tokenizer's (or, for the reference rows, ours over the reference).

Usage: python bench/bench_detokenizers.py [--batch 8] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def pixels(batch: int, repeats: int) -> list[tuple[str, float, str, float]]:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from tokenizers_mm.detokenizers import PixelDecoder
    from tokenizers_mm.image import ImagePatches

    cfg = ViTMAEConfig(
        image_size=224,
        patch_size=16,
        hidden_size=384,
        num_hidden_layers=1,
        num_attention_heads=6,
        intermediate_size=1536,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=8,
        decoder_num_attention_heads=16,
        decoder_intermediate_size=2048,
        attn_implementation="sdpa",
    )
    hf = ViTMAEForPreTraining(cfg).eval()
    hf.decoder.initialize_weights(196)
    tok = ImagePatches(img_size=224, patch_size=16, embed_dim=384).eval()
    dec = PixelDecoder.from_hf_vit_mae(hf.decoder).eval()
    images = torch.randn(batch, 3, 224, 224)
    tokens = tok(images)
    ids_restore = torch.arange(196).expand(batch, -1)
    with torch.inference_mode():
        ours, theirs = dec(tokens), hf.decoder(tokens.x, ids_restore).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        t = timed(
            {"tok": lambda: tok(images), "dec": lambda: dec(tokens), "hf": lambda: hf.decoder(tokens.x, ids_restore)},
            repeats,
        )
    return [
        ("pixels: image_patches (224 px, p16)", t["tok"], "1.00", 1.0),
        ("pixels: MAE decoder 512 x 8 (ours)", t["dec"], f"{t['dec'] / t['tok']:.2f}", t["dec"] / t["tok"]),
        ("pixels: HF ViTMAEDecoder (reference)", t["hf"], f"ours/ref {t['dec'] / t['hf']:.2f}", t["dec"] / t["hf"]),
    ]


def points(batch: int, repeats: int) -> list[tuple[str, float, str, float]]:
    from tokenizers_mm import Tokens
    from tokenizers_mm.detokenizers import PointDecoder, chamfer_distance
    from tokenizers_mm.points import PointGroups, group_points

    tok = PointGroups(num_groups=64, group_size=32, embed_dim=384).eval()
    dec = PointDecoder(in_dim=384, decoder_dim=384, depth=4, num_heads=6, group_size=32).eval()
    cloud = torch.randn(batch, 1024, 3)
    groups, centers, _ = group_points(cloud, 64, 32)
    tokens = tok(cloud)
    masked = torch.zeros(batch, 64, dtype=torch.bool)
    masked[:, ::2] = True
    visible = Tokens(x=tokens.x[:, 1:][~masked].reshape(batch, 32, 384), modality="points")
    pred = dec(visible, centers, masked)
    a, b = pred[masked], groups[masked][..., :3]

    def brute():
        d = torch.cdist(a, b).square()
        return d.min(2).values.mean(1) + d.min(1).values.mean(1)

    with torch.inference_mode():
        torch.testing.assert_close(chamfer_distance(a, b, reduction="none"), brute(), atol=1e-5, rtol=1e-5)
        t = timed(
            {
                "tok": lambda: tok(cloud),
                "dec": lambda: dec(visible, centers, masked),
                "cd": lambda: chamfer_distance(a, b),
                "ref": brute,
            },
            repeats,
        )
    return [
        ("points: points tokenizer (1024 pts, 64 x 32)", t["tok"], "1.00", 1.0),
        ("points: Point-MAE decoder 384 x 4", t["dec"], f"{t['dec'] / t['tok']:.2f}", t["dec"] / t["tok"]),
        ("points: Chamfer-L2 (ours)", t["cd"], f"{t['cd'] / t['tok']:.2f}", t["cd"] / t["tok"]),
        ("points: Chamfer-L2 brute-force cdist (ref)", t["ref"], f"ours/ref {t['cd'] / t['ref']:.2f}", 0.0),
    ]


def waveform(batch: int, repeats: int) -> list[tuple[str, float, str, float]]:
    import torchaudio

    from tokenizers_mm.audio import AudioPatches
    from tokenizers_mm.detokenizers import GriffinLimVocoder, WaveformDecoder

    tok = AudioPatches(embed_dim=192, num_mel_bins=128, target_frames=96, fstride=16, tstride=16).eval()
    dec = WaveformDecoder(
        in_dim=192, num_mel_bins=128, target_frames=96, decoder_dim=128, depth=2, num_heads=4, n_iter=32
    ).eval()
    wave = torch.randn(batch, 15360) * 0.1
    tokens = tok(wave)
    feats, frames = dec.features(wave)
    mel = GriffinLimVocoder(
        "mel", 16000, n_fft=400, n_mels=64, n_iter=32, rand_init=False, layout="bft", driver="gelsd"
    )
    spec = torch.rand(batch, 64, 97) + 0.1
    inv = torchaudio.transforms.InverseMelScale(201, 64, 16000, driver="gelsd")
    gl = torchaudio.transforms.GriffinLim(400, n_iter=32, rand_init=False)
    with torch.inference_mode():
        t = timed(
            {
                "tok": lambda: tok(wave),
                "dec": lambda: dec(tokens),
                "voc": lambda: dec.to_waveform(feats, frames),
                "mel": lambda: mel(spec),
                "ref": lambda: gl(inv(spec)),
            },
            repeats,
        )
    return [
        ("waveform: audio_patches (0.96 s, 128 mel)", t["tok"], "1.00", 1.0),
        ("waveform: fbank-patch decoder 128 x 2", t["dec"], f"{t['dec'] / t['tok']:.2f}", t["dec"] / t["tok"]),
        ("waveform: Griffin-Lim 32 it, Kaldi banks", t["voc"], f"{t['voc'] / t['tok']:.2f}", t["voc"] / t["tok"]),
        ("waveform: mel kind (ours)", t["mel"], f"ours/ref {t['mel'] / t['ref']:.2f}", 0.0),
        ("waveform: torchaudio InverseMelScale+GriffinLim", t["ref"], "-", 0.0),
    ]


def motion(batch: int, repeats: int) -> list[tuple[str, float, str, float]]:
    from tokenizers_mm.detokenizers import MotionDecoder, warp_clip
    from tokenizers_mm.motion import MotionTokens

    tok = MotionTokens(embed_dim=192, patch_size=1, t_patch=2, source="codec", img_size=64, num_frames=16).eval()
    dec = MotionDecoder(in_dim=192, patch_size=1, t_patch=2, scale=tok.scale, depth=2, num_heads=4).eval()
    field = torch.randint(-3, 4, (batch, 15, 2, 4, 4)).float()
    keyframe = torch.rand(batch, 3, 64, 64)
    tokens = tok(motion=field)
    with torch.inference_mode():
        t = timed(
            {
                "tok": lambda: tok(motion=field),
                "dec": lambda: dec(tokens),
                "warp": lambda: warp_clip(keyframe, field, 16),
            },
            repeats,
        )
    return [
        ("motion: motion tokenizer (16 frames, 4x4 blocks)", t["tok"], "1.00", 1.0),
        ("motion: motion decoder 192 x 2", t["dec"], f"{t['dec'] / t['tok']:.2f}", t["dec"] / t["tok"]),
        ("motion: warp_clip render (64 px)", t["warp"], f"{t['warp'] / t['tok']:.2f}", t["warp"] / t["tok"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, batch {args.batch}, median of "
        f"{args.repeats}; outputs checked against the references first"
    )
    rows = []
    for part in (pixels, points, waveform, motion):
        rows += part(args.batch, args.repeats)
    print(f"{'row':52s} {'ms':>9s}  ratio")
    for name, ms, ratio, _ in rows:
        print(f"{name:52s} {ms:9.2f}  {ratio}")


if __name__ == "__main__":
    main()
