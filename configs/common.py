"""Shared base of every depthuda experiment config.

Experiment files (`configs/<experiment>.py`) call `get_base_config()` and override what differs;
the numbers here are the original's (METHOD.md §1-§7 in the project's notes, BUILD_NOTES.md).
The base declares every field a config may have: depthuda checks each config against it (names,
types, allowed values; depthuda/config_files.py) before it starts any work.
"""

import ml_collections

# METHOD §5: class weights of the segmentation loss.
CLASS_WEIGHTS_16 = (0.327, 0.313, 0.206, 22.427, 22.558, 5.811, 155.643, 59.528, 0.586, 0.882,
                    1.423, 12.871, 1.488, 3.955, 29.164, 27.563)
CLASS_WEIGHTS_7 = (0.349, 0.462, 11.576, 1.325, 1.993, 3.216, 3.192)
# METHOD §6: the original's N_c of the spatial prior, rounded (`pseudo.min_region_sizes`; the
# small variants use them unscaled). The 7-class ones were set by hand.
MIN_REGION_SIZES_16 = (3165, 3311, 5000, 89, 89, 219, 50, 61, 1788, 1202, 762, 123, 730, 302,
                       78, 81)
MIN_REGION_SIZES_CITY7 = (1000, 772, 100, 316, 234, 173, 173)
MIN_REGION_SIZES_MAPILLARY7 = (100, 87, 50, 62, 57, 54, 54)


def get_base_config() -> ml_collections.ConfigDict:
  """SYNTHIA -> Cityscapes, 16 classes, DeepLabV2-ResNet101 at 1280x760 (the paper's setup)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 1  # Global images per domain per step; the original trains 1 source + 1 target.
  # A directory written by `python -m depthuda.convert`: the real experiments start from the
  # ImageNet weights, as the original (README, "Training on real data"); '' = from scratch.
  c.init_from = 'pretrained/imagenet'
  c.compute_dtype = 'float32'
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_images_every_steps = 5000
  c.nonfinite = 'stop'  # 'stop' or 'skip' a step whose loss is not finite.
  # The model a training stage hands on (pseudo-labels, self-training's start, the reported
  # score): 'best' on the target validation set, chosen with its labels (the original), or 'last'.
  c.model_selection = 'best'

  c.model = ml_collections.ConfigDict()
  c.model.layers = (3, 4, 23, 3)
  c.model.width = 64
  c.model.bn_mode = 'train'  # 'train' (original: batch statistics, running stats updated) | 'frozen'
  c.model.bn_sync = False    # True: batch statistics averaged over all devices (SyncBN).
  c.model.head_init = 'normal'  # Depth/density heads: N(0, 0.01) as the original, or 'he'.
  c.model.disc_ndf = 64

  c.data = ml_collections.ConfigDict()
  c.data.source = 'synthia'
  c.data.target = 'cityscapes'
  c.data.source_dir = 'data/SYNTHIA-RAND-CITYSCAPES'
  c.data.target_dir = 'data/cityscapes'
  c.data.tfds_dir = 'data/tfds'
  c.data.num_classes = 16
  c.data.input_size = (1280, 760)   # (W, H)
  c.data.label_size = (2048, 1024)  # (W, H) of the evaluation labels.
  c.data.toy = False  # True: generate the toy benchmark's datasets (configs/toy.py) if missing
  # The sizes of the generated toy datasets (used only with data.toy).
  c.data.toy_num_source = 200
  c.data.toy_num_target_train = 100
  c.data.toy_num_target_val = 40
  c.data.toy_num_target_test = 4
  c.data.toy_source_size = (320, 190)  # (W, H) of the generated source images
  c.data.cache_decoded = False
  c.data.shuffle_buffer = 512

  c.loss = ml_collections.ConfigDict()
  c.loss.lambda_seg = 1.0
  c.loss.lambda_depth = 0.005
  c.loss.lambda_bal_src = 0.01
  c.loss.lambda_bal_tgt = 0.05
  c.loss.lambda_adv = 0.05
  c.loss.class_weights = CLASS_WEIGHTS_16
  # What the discriminator classifies (the reviewers' ablations; README, "Results"), each from
  # the segmentation softmax p = softmax(up(seg)): 'softmax' p itself (AdaptSegNet); 'entropy'
  # the weighted self-information -p log2 p / log2 C (AdvEnt); 'entropy_depth' that times the
  # predicted inverse depth (DADA-style); 'entropy_density' that times the predicted density
  # (the method, METHOD §5).
  c.loss.disc_input = 'entropy_density'
  # False: no density supervision (L_bal_src and L_bal_tgt off whatever their lambdas; the
  # density head then only moves through D's input).
  c.loss.density_losses = True

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2.5e-4
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.poly_power = 0.9
  c.optim.poly_horizon = 90_000
  c.optim.disc_lr = 1e-3
  c.optim.disc_b1 = 0.9
  c.optim.disc_b2 = 0.99

  c.adapt = ml_collections.ConfigDict()
  c.adapt.num_steps = 90_000
  c.self_train = ml_collections.ConfigDict()
  c.self_train.num_steps = 30_000
  # False: no pseudo_label and self_train stages; `eval` scores the adapt stage's model.
  c.self_train.enabled = True

  c.gmm = ml_collections.ConfigDict()
  c.gmm.num_components = 5
  c.gmm.max_iters = 100
  c.gmm.tol = 1e-3
  c.gmm.var_floor = 1e-6
  c.gmm.density_scale = 1e6  # The 1e6 of g(p) = 255 (1 - exp(-1e6 p)), METHOD §4.

  c.pseudo = ml_collections.ConfigDict()
  c.pseudo.threshold = 0.9
  # False: pseudo-labels are the confidence rule alone, without the spatial aggregation prior's
  # removal of regions smaller than N_c.
  c.pseudo.spatial_prior = True
  # None: computed from the source pixel counts (METHOD §6); a tuple overrides.
  c.pseudo.min_region_sizes = ml_collections.FieldReference(None, field_type=tuple)
  # The input size at which the computed N_c hold (METHOD §6); other sizes scale by area.
  c.pseudo.reference_input_size = (1280, 760)

  # A pretrained start made by depthuda itself, for the toy (data.toy), which has no ImageNet
  # weights: num_steps > 0 trains the trunk on separately generated source-style scenes and
  # writes it to init_from on first use (depthuda/pretrain.py); 0: init_from as it is.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.num_steps = 0
  c.pretrain.seed = 1  # the scenes' generator seed; the toy's own datasets use 0
  c.pretrain.num_images = 400
  c.pretrain.lr = 1e-2  # the pretraining's SGD rate (its own: `optim.lr` is the adaptation's)

  c.eval = ml_collections.ConfigDict()
  c.eval.num_images = 0  # 0: the whole validation set.
  c.eval.num_panels = 4
  # Labels scored at 'native' resolution (Cityscapes: data.label_size) or resized to the
  # 'input_size' (Mapillary: the original's protocol; README, "Evaluation").
  c.eval.protocol = 'native'
  c.eval.flip = False     # True: average the softmax with that of the mirrored image.
  c.eval.scales = (1.0,)  # Input scales whose softmax is averaged; the original uses (1.0,).
  return c


def seven_class(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The 7-class variant (flat, construction, object, nature, sky, human, vehicle)."""
  c.data.num_classes = 7
  c.loss.class_weights = CLASS_WEIGHTS_7
  return c


def small_input(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The 'small' variants: 640x320 input, a 81x41 feature grid."""
  c.data.input_size = (640, 320)
  return c
