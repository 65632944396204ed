"""Which graphs (or engines) a `Classifier` opens for its backend, and opening them.

The bundle may hold, per precision, plain and fused graphs (novic.export.fused) and, for the
encoder ort-cuda loads, a twin taking uint8 pixels (novic.export.u8). `Classifier.load`'s
`precision`, `fused` and `u8` choose among them here, each defaulting to what the backend prefers
(novic.runtime.backends.select); asking for one the bundle lacks is one error line naming the fix.
Everything opened is registered with the caller's ExitStack at once, so that a later failure
closes it (a retrying caller must not pile up GPU memory)."""
from __future__ import annotations

from contextlib import ExitStack

from novic.runtime.bundle import QUANTIZED
from novic.runtime.classifier import ClassifierError, close_quietly


def ort_variants(bundle, precision: str, backend: str, fused: bool | None) -> tuple[str, str]:
    """"fused" or "plain" for the encoder and for the decoder graphs of `precision`, the final one
    (see Classifier.load's `fused`; None: `prefers_fused(backend)`). The two are gated apart at
    export, so either may be missing."""
    from novic.runtime.backends.select import prefers_fused

    have = {part: bundle.has_fused(precision, roles) for part, roles in
            (("encoder", ("image_encoder",)), ("decoder", ("decoder_prefill", "decoder_step")))}
    if fused and not any(have.values()):
        raise ClassifierError(f"{bundle.path}: no fused {precision} graphs in this bundle (they are written by "
                              "novic-export onnx and left out when they fail their gate); re-export, or load "
                              "without fused=True")
    take = prefers_fused(backend) if fused is None else fused
    return tuple("fused" if take and have[part] else "plain" for part in ("encoder", "decoder"))


def encoder_input(bundle, precision: str, variant: str, backend: str, u8: bool | None) -> str:
    """Which image encoder input to load for the encoder `precision`/`variant` (see Classifier.load's
    `u8`): the uint8 one where asked for or preferred (`prefers_u8`) and present, else the float one."""
    from novic.runtime.backends.select import prefers_u8
    from novic.runtime.bundle import FLOAT_PIXELS, U8_PIXELS

    have = bundle.has_u8(precision, variant)
    if u8 and not have:
        other = "plain" if variant == "fused" else "fused"
        fix = (f"load with fused={other == 'fused'} (the {other} encoder has one)" if bundle.has_u8(precision, other)
               else "re-export")
        raise ClassifierError(f"{bundle.path}: no {precision} {variant} image encoder taking uint8 pixels in this "
                              f"bundle (written by novic-export onnx for the encoder ort-cuda loads, left out when "
                              f"it fails its gate); {fix}, or load without u8=True")
    take = prefers_u8(backend) if u8 is None else u8
    return U8_PIXELS if take and have else FLOAT_PIXELS


def open_ort(bundle, choice, precision, threads, device_id, fused, u8, opened: ExitStack):
    """The onnxruntime encoder and decoder -> (encoder, decoder, precision, variant); each one is
    registered with `opened` as soon as it is open (closed there if a later step fails)."""
    from novic.runtime.backends.ort import OrtDecoderSession, OrtImageEncoder

    provider = "cuda" if choice.backend == "ort-cuda" else "cpu"
    want = precision or choice.precision
    have = bundle.precisions("decoder_step")
    if want in QUANTIZED:  # int8/fp8 = the calibrated image encoder (novic-export calib) + the fp32 decoder
        if fused or u8:
            what = "fused" if fused else "u8"
            raise ClassifierError(f"{what}=True: there are no {what} {want} graphs (they are fp32/fp16); "
                                  f"drop {what}=True or load precision 'fp32' or 'fp16'")
        if want not in bundle.precisions("image_encoder"):
            method = "modelopt-fp8" if want == "fp8" else "dynamic"
            raise ClassifierError(f"{bundle.path}: no {want} image encoder in this bundle; create one with "
                                  f"novic-export calib {bundle.path} --method {method}")
        encoder = OrtImageEncoder(bundle.artifact_path("image_encoder", want), provider=provider,
                                  threads=threads, device_id=device_id)
        opened.callback(close_quietly, encoder)
        decoder = OrtDecoderSession(bundle.artifact_path("decoder_prefill", "fp32"),
                                    bundle.artifact_path("decoder_step", "fp32"), bundle.decoder_config,
                                    provider=provider, threads=threads, device_id=device_id)
        opened.callback(close_quietly, decoder)
        return encoder, decoder, want, "plain"
    if want not in have:
        if precision is not None:
            raise ClassifierError(f"{bundle.path}: no {want} decoder graphs (bundle has {', '.join(have)}); "
                                  f"pick one of those or re-export")
        want = "fp32" if "fp32" in have else have[0]
    enc_variant, dec_variant = ort_variants(bundle, want, choice.backend, fused)
    enc_have = bundle.precisions("image_encoder", enc_variant)
    enc_prec = want if want in enc_have else ("fp32" if "fp32" in enc_have else enc_have[0])
    pixels = encoder_input(bundle, enc_prec, enc_variant, choice.backend, u8)
    encoder = OrtImageEncoder(bundle.artifact_path("image_encoder", enc_prec, enc_variant, pixels),
                              provider=provider, threads=threads, device_id=device_id)
    opened.callback(close_quietly, encoder)
    decoder = OrtDecoderSession(bundle.artifact_path("decoder_prefill", want, dec_variant),
                                bundle.artifact_path("decoder_step", want, dec_variant), bundle.decoder_config,
                                provider=provider, threads=threads, device_id=device_id)
    opened.callback(close_quietly, decoder)
    variant = {("fused", "fused"): "fused", ("fused", "plain"): "fused encoder",
               ("plain", "fused"): "fused decoder"}.get((enc_variant, dec_variant), "plain")
    return encoder, decoder, want, variant


def open_trt(bundle, choice, device_id, opened: ExitStack):  # pragma: no cover - needs a GPU with TensorRT
    from novic.runtime.backends import trt as trt_backend

    engines = choice.engines
    encoder = trt_backend.TrtImageEncoder(bundle.engine_path(engines["image_encoder"]),
                                          engines["image_encoder"], device_id=device_id)
    opened.callback(close_quietly, encoder)
    decoder = trt_backend.TrtDecoderSession(bundle.engine_path(engines["decoder_prefill"]),
                                            bundle.engine_path(engines["decoder_step"]),
                                            bundle.decoder_config, engines=engines, device_id=device_id)
    opened.callback(close_quietly, decoder)
    return encoder, decoder, choice.precision
