"""Sonic's pipeline as steps, the way diffusers' pipelines read; :class:`sonic_rt.Runtime` calls them in order.

=================  =========================================================================================
module             holds
=================  =========================================================================================
``options``        :class:`AnimateOptions`: every option of ``animate`` with its default, unit and source
``components``     :func:`load_components`: weights or engines -> one :class:`Components` object
``inputs``         :func:`check_inputs` (step 1) -> :class:`PreparedInputs`
``steps``          steps 2-7: ``audio_features``, ``encode_reference``, ``encode_audio``,
                   ``guided_denoiser``, ``prepare_latents``, ``open_output``, ``denoise``
``guidance``       :class:`GuidedDenoiser`: CFG rows [uncond, drop_audio, cond] in, guided v out
``output``         :class:`StreamingOutput`: decode -> interpolate -> encode in VAE chunks
``memory``         the ``low_memory`` plan; :class:`MemoryFallback`, the out-of-memory policy (halve and retry)
``timing``         :data:`STAGES` and :class:`StageTimer`
=================  =========================================================================================

This package imports nothing itself, so ``sonic_rt.pipeline.options`` (used by the sampler's defaults, the
CLI and user interfaces) loads without torch or the models.
"""
