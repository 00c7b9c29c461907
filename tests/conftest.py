"""Every test process sees 4 CPU devices, so multi-device code is tested against 1 device."""

import os

# Tiny models: compile time dominates, so XLA's backend optimisations are not worth it.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
