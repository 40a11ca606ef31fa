"""The diffusion maths: schedules, parameterisations, the denoiser, guidance and seeded noise.

No networks and no I/O; samplers live in ``latentdiffusion.samplers``.
"""
