"""The official model configurations, as published in their config files.

The loader never uses these: it reads every size from the config files in the model directory. They
are here to (a) build the full-size architecture on the meta device in tests (its keys and shapes must
equal ``tests/data/sonic_checkpoint_keys.txt``), (b) build full-size random-weight models for GPU benchmarks, and
(c) derive the small demo checkpoint from.

Sources: ``stabilityai/stable-video-diffusion-img2vid-xt`` ``unet/config.json``, ``vae/config.json``,
``image_encoder/config.json``, ``scheduler/scheduler_config.json``; ``openai/whisper-tiny``
``config.json``; docs/official_algorithm.md sections 2.1-2.6 and 3.
"""

from __future__ import annotations

SVD_XT_UNET_CONFIG: dict = {
    "_class_name": "UNetSpatioTemporalConditionModel",
    "addition_time_embed_dim": 256,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "in_channels": 8,
    "layers_per_block": 2,
    "num_attention_heads": [5, 10, 20, 20],
    "num_frames": 25,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 768,
    "sample_size": 96,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
}

SVD_XT_VAE_CONFIG: dict = {
    "_class_name": "AutoencoderKLTemporalDecoder",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}

SVD_XT_IMAGE_ENCODER_CONFIG: dict = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "model_type": "clip_vision_model",
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "image_size": 224,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "projection_dim": 1024,
}

SVD_XT_SCHEDULER_CONFIG: dict = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
}

WHISPER_TINY_CONFIG: dict = {
    "architectures": ["WhisperForConditionalGeneration"],
    "model_type": "whisper",
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "vocab_size": 51865,
    "pad_token_id": 50257,
    "bos_token_id": 50257,
    "eos_token_id": 50257,
    "decoder_start_token_id": 50258,
}

# Sonic's own adapters have no config file; these are the constructor arguments of official sonic.py.
AUDIO2TOKEN_ARGS: dict = dict(
    seq_len=10, blocks=5, channels=384, intermediate_dim=1024, output_dim=1024, context_tokens=32
)
AUDIO2BUCKET_ARGS: dict = dict(
    seq_len=50, blocks=1, channels=384, clip_channels=1024, intermediate_dim=1024, output_dim=1, context_tokens=2
)
RIFE_WIDTH: int = 90
