"""Latent models: the autoencoder's decode step (torch and the bundle's decoder.onnx) equals diffusers' pipelines,
a latent model goes FP checkpoint -> calibrate -> export -> sample with decoded images, and changed or missing
autoencoder weights are refused.

Tiny random VQModel / AutoencoderKL saved with ``save_pretrained`` (no download): 3x16x16 images, latents of 8x8.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch


LATENT = 8  # latent size; the tiny autoencoders upsample once: 16x16 images


@pytest.mark.parametrize("cls_name,pipeline", [("VQModel", "ldm_pipeline_dir"), ("AutoencoderKL", "kl_pipeline_dir")])
def test_decoder_equals_the_pipeline_decode_and_its_onnx(tmp_path, cls_name, pipeline, request):
    import diffusers

    from tdqrt.calibration.models.autoencoder import LatentDecoder
    from tdqrt.calibration.models.sources import autoencoder_record
    from tdqrt.engines.ort import create_session
    from tdqrt.export.decoder import export_decoder

    folder = request.getfixturevalue(pipeline) / ("vqvae" if cls_name == "VQModel" else "vae")
    record = autoencoder_record(folder)
    decoder = LatentDecoder.from_record(record)
    channels = record["latent_channels"]
    latents = torch.randn(3, channels, LATENT, LATENT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = decoder(latents)
        # LDMPipeline.__call__ / StableDiffusionPipeline's decode: autoencoder.decode(latents / scaling_factor),
        # then (image / 2 + 0.5).clamp(0, 1)
        ae = getattr(diffusers, cls_name).from_pretrained(record["path"], local_files_only=True).eval()
        reference = (ae.decode(latents / ae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert ours.shape == (3, 3, 2 * LATENT, 2 * LATENT)
    torch.testing.assert_close(ours / 2 + 0.5, reference, atol=1e-6, rtol=0)
    if cls_name == "VQModel":  # the decode quantizes to the codebook, as LDMPipeline's does
        with torch.no_grad():
            unquantized = ae.decode(latents / ae.config.scaling_factor, force_not_quantize=True).sample.clamp(-1, 1)
        assert (unquantized - ours).abs().max() > 1e-2

    files, info = export_decoder(decoder, (channels, LATENT, LATENT), tmp_path / "decoder.onnx")
    assert files == ["decoder.onnx"]
    assert info["image_size"] == 2 * LATENT and info["out_channels"] == 3
    assert info["latent_shape"] == [channels, LATENT, LATENT]
    session = create_session(tmp_path / "decoder.onnx")
    onnx_images = session.run(None, {"latents": latents.numpy()})[0]  # batch 3: the traced batch was 2
    # 1e-4 on images in [-1, 1]: float rounding only (measured ~4e-6); for the VQModel a latent within rounding of
    # two codebook entries could pick the other one in ONNX Runtime — these random latents are far from such ties
    np.testing.assert_allclose(onnx_images, ours.numpy(), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def latent_model(ldm_pipeline_dir, tmp_path_factory):
    """A copy of the tiny LDMPipeline folder (a diffusers UNet on 3x8x8 VQ latents; the tests below change its
    autoencoder), min-max W8A8 on a tiny calibration set, exported (trt flavour, no FP reference) to a bundle."""
    from tdqrt.calibration.models.sources import autoencoder_record
    from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
    from tdqrt.calibration.quant.calib_set import CalibSetConfig
    from tdqrt.export.bundle import export_bundle
    from tdqrt.export.exporter import ExportConfig
    from tdqrt.runtime.sampling import SamplerConfig

    root = tmp_path_factory.mktemp("latent")
    fp = shutil.copytree(ldm_pipeline_dir, root / "pipeline")
    record = autoencoder_record(fp / "vqvae")
    calib = CalibSetConfig(num=4, keep_steps=2, batch=4, sampler=SamplerConfig(steps=4))
    quant = calibrate(fp, root / "q", CalibrateConfig(calib_set=calib), progress=False)
    bundle = export_bundle(quant, root / "bundle", ExportConfig(polygraphy=False, fp_reference=False))
    return {"root": root, "record": record, "fp": fp, "quant": quant, "bundle": bundle}


def _latents(model, schedule, job, shape):
    """The latents ``sample_model`` draws for ``job`` (its batches, seed and sampler), without decoding."""
    from tdqrt.runtime.sampling import sample
    from tdqrt.runtime.schedules import NoiseSchedule

    parts = []
    for start in range(0, job.num, job.batch):
        idx = torch.arange(start, min(job.num, start + job.batch))
        parts.append(sample(model, NoiseSchedule(schedule), job.sampler, sample_indices=idx, seed=job.seed,
                            shape=shape))
    return parts


def test_latent_bundle_samples_decoded_images(latent_model, tmp_path):
    from tdqrt.calibration.data.images import to_uint8_nhwc
    from tdqrt.calibration.models.autoencoder import LatentDecoder
    from tdqrt.engines.bundle import open_bundle
    from tdqrt.engines.decoder import OrtDecoder
    from tdqrt.engines.errors import ConfigError
    from tdqrt.engines.ort import OrtDenoiser
    from tdqrt.runtime.sampling import SamplerConfig
    from tdqrt.runtime.schedules import ScheduleConfig
    from tdqrt.tools.sample import SampleJob, sample_model

    bundle = open_bundle(latent_model["bundle"])
    record = latent_model["record"]
    entry = bundle.manifest["decoder"]
    assert entry == {"record": record, "image_size": 16, "out_channels": 3, "latent_shape": [3, LATENT, LATENT]}
    assert bundle.files["decoder.onnx"]["role"].startswith("FP32 latent decoder")
    assert bundle.decoder_path == bundle.path / "decoder.onnx"
    assert (bundle.output_image_size, bundle.output_channels, bundle.image_size) == (16, 3, LATENT)

    job = SampleJob(num=3, batch=2, seed=5, sampler=SamplerConfig(steps=3))
    result = sample_model(bundle.path, tmp_path / "s", job, progress=False)
    assert result.images.shape == (3, 16, 16, 3) and result.images.dtype == np.uint8
    with np.load(tmp_path / "s" / "samples.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], result.images)
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert meta["decoder"] == {"kind": "onnx", "path": str(bundle.path / "decoder.onnx"),
                               "sha256": bundle.files["decoder.onnx"]["sha256"], "image_size": 16, "out_channels": 3}

    latents = _latents(OrtDenoiser(bundle), ScheduleConfig.from_dict(bundle.schedule), job, (3, LATENT, LATENT))
    onnx_decoded = np.concatenate([to_uint8_nhwc(OrtDecoder(bundle)(z)) for z in latents])
    np.testing.assert_array_equal(result.images, onnx_decoded)
    torch_decoder = LatentDecoder.from_record(record)
    with torch.no_grad():
        torch_decoded = np.concatenate([to_uint8_nhwc(torch_decoder(z)) for z in latents])
    with pytest.raises(ConfigError, match=r"decodes latents shaped \[B, 3, 8, 8\]"):
        OrtDecoder(bundle)(torch.zeros(1, 4, LATENT, LATENT))
    # ORT and torch decodes agree to ~1e-5, so a value may round to the neighbouring uint8 level
    assert np.abs(result.images.astype(int) - torch_decoded.astype(int)).max() <= 1
    assert (result.images != result.images[0]).any()  # three different images, not a constant


def test_latent_quant_model_samples_decoded_images(latent_model, tmp_path):
    from tdqrt.calibration.data.images import to_uint8_nhwc
    from tdqrt.calibration.models.autoencoder import LatentDecoder
    from tdqrt.calibration.quant.api import load_model_dir
    from tdqrt.runtime.sampling import SamplerConfig
    from tdqrt.tools.sample import SampleJob, sample_model

    job = SampleJob(num=3, batch=2, seed=5, sampler=SamplerConfig(steps=3))
    result = sample_model(latent_model["quant"], tmp_path / "s", job, progress=False)
    assert result.images.shape == (3, 16, 16, 3)
    record = latent_model["record"]
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert meta["decoder"] == {"kind": "VQModel", "path": str(Path(record["path"]) / record["weights"]),
                               "sha256": record["sha256"], "image_size": 16, "out_channels": 3}
    rec = load_model_dir(latent_model["quant"])
    assert rec.card["autoencoder"] == record  # calibrate carried the FP card's record into quant.json
    decoder = LatentDecoder.from_record(record)
    with torch.no_grad():
        expected = np.concatenate([to_uint8_nhwc(decoder(z))
                                   for z in _latents(rec.model, rec.schedule, job, (3, LATENT, LATENT))])
    np.testing.assert_array_equal(result.images, expected)


def test_changed_or_missing_autoencoder_is_refused(latent_model, tmp_path, capsys):
    from tdqrt.tools.cli import main

    folder = Path(latent_model["record"]["path"])
    weights = folder / latent_model["record"]["weights"]
    saved = weights.read_bytes()
    try:
        weights.write_bytes(saved[:-8] + bytes(8))  # same size, other weights
        out = tmp_path / "bundle"
        assert main(["export", "--quant", str(latent_model["quant"]), "--out", str(out), "--no-polygraphy"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(weights) in err and "changed after the model was made" in err
        assert not out.exists()
        samples = tmp_path / "samples"
        assert main(["sample", "--model", str(latent_model["quant"]), "--out", str(samples), "--num", "2",
                     "--steps", "2", "--d2", "off"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "changed after the model was made" in err
        assert not samples.exists()
    finally:
        weights.write_bytes(saved)
    moved = folder.with_name("vqvae-moved")
    folder.rename(moved)
    try:
        assert main(["export", "--quant", str(latent_model["quant"]), "--out", str(out), "--no-polygraphy"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "missing" in err and str(folder) in err
        assert not out.exists()
        # the bundle is self-contained: it still samples without the autoencoder folder
        assert main(["sample", "--model", str(latent_model["bundle"]), "--out", str(samples), "--num", "2",
                     "--steps", "2", "--d2", "off"]) == 0
        with np.load(samples / "samples.npz") as npz:
            assert npz["arr_0"].shape == (2, 16, 16, 3)
    finally:
        moved.rename(folder)
    shutil.rmtree(samples)
