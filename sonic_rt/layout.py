"""The official checkpoint folder's names (torch-free, so the CLI and ``download`` import them without torch).

Source: the official release's folder layout (``Sonic/``, ``stable-video-diffusion-img2vid-xt/``, ``whisper-tiny/``,
``RIFE/``), as ``sonic_rt.checkpoint`` loads it and ``python -m sonic_rt download`` fetches it.
"""

SVD_DIR = "stable-video-diffusion-img2vid-xt"
WHISPER_DIR = "whisper-tiny"

# Official pickles that `convert` rewrites, relative to the model directory.
PICKLED_CHECKPOINTS = ("Sonic/unet.pth", "Sonic/audio2token.pth", "Sonic/audio2bucket.pth", "RIFE/flownet.pkl")
