"""The five experiment configs against the original's settings (METHOD.md §1, §5, §6)."""

import importlib

import pytest

N_C_16 = (3165, 3311, 5000, 89, 89, 219, 50, 61, 1788, 1202, 762, 123, 730, 302, 78, 81)
N_C_CITY7 = (1000, 772, 100, 316, 234, 173, 173)
N_C_MAPILLARY7 = (100, 87, 50, 62, 57, 54, 54)
WEIGHTS_16 = (0.327, 0.313, 0.206, 22.427, 22.558, 5.811, 155.643, 59.528, 0.586, 0.882, 1.423,
              12.871, 1.488, 3.955, 29.164, 27.563)
WEIGHTS_CITY7 = (0.349, 0.462, 11.576, 1.325, 1.993, 3.216, 3.192)

# Settings every experiment shares: the segmenter's SGD, the discriminator's Adam, the poly
# schedule (whose horizon stays 90,000 in self-training), 90,000 adaptation iterations.
COMMON = {
    'loss.lambda_seg': 1.0,
    'optim.lr': 2.5e-4, 'optim.momentum': 0.9, 'optim.weight_decay': 5e-4,
    'optim.disc_b1': 0.9, 'optim.disc_b2': 0.99,
    'optim.poly_horizon': 90_000, 'optim.poly_power': 0.9,
    'adapt.num_steps': 90_000,
    'pseudo.threshold': 0.9,
    'gmm.num_components': 5,
    'data.source': 'synthia',
}
CITY16 = {
    'data.target': 'cityscapes', 'data.num_classes': 16, 'data.input_size': (1280, 760),
    'loss.lambda_bal_src': 0.01, 'loss.lambda_depth': 0.005, 'loss.lambda_adv': 0.05,
    'loss.lambda_bal_tgt': 0.05, 'optim.disc_lr': 1e-3,
    'self_train.num_steps': 30_000,
    'pseudo.min_region_sizes': N_C_16, 'loss.class_weights': WEIGHTS_16,
}
CITY7 = dict(CITY16, **{
    'data.num_classes': 7, 'self_train.num_steps': 10_000,
    'pseudo.min_region_sizes': N_C_CITY7, 'loss.class_weights': WEIGHTS_CITY7,
})
MAPILLARY7 = {
    'data.target': 'mapillary', 'data.num_classes': 7, 'data.input_size': (1280, 760),
    'loss.lambda_bal_src': 0.005, 'loss.lambda_depth': 0.0001, 'loss.lambda_adv': 0.001,
    'loss.lambda_bal_tgt': 0.001, 'optim.disc_lr': 1e-4,
    'self_train.num_steps': 30_000,
    'pseudo.min_region_sizes': N_C_MAPILLARY7, 'loss.class_weights': None,  # unweighted
}
ORIGINAL = {
    'synthia_city': CITY16,
    'synthia_city7': CITY7,
    # Only city7 self-trains for 10,000 iterations; its small variant for 30,000.
    'synthia_city7_small': dict(CITY7, **{'data.input_size': (640, 320),
                                          'loss.lambda_depth': 0.001,
                                          'self_train.num_steps': 30_000}),
    'synthia_mapillary7': MAPILLARY7,
    'synthia_mapillary7_small': dict(MAPILLARY7, **{'data.input_size': (640, 320)}),
}


def _field(config, dotted):
  for name in dotted.split('.'):
    config = config[name]
  return config


@pytest.mark.parametrize('experiment', sorted(ORIGINAL))
def test_config_matches_the_original(experiment):
  config = importlib.import_module(f'configs.{experiment}').get_config()
  expected = dict(COMMON, **ORIGINAL[experiment])
  differences = {}
  for name, want in expected.items():
    got = _field(config, name)
    if isinstance(want, tuple):
      got = tuple(got) if got is not None else None
    close = isinstance(want, (float, tuple))  # float settings up to rounding
    if not (got == pytest.approx(want) if close else got == want):
      differences[name] = (got, want)
  assert not differences, f'{experiment}: (config, original) {differences}'
  assert config.init_from == 'pretrained/imagenet'
