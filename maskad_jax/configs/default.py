"""Shared base config (ml_collections). Dataset configs and variants override parts of it.

Every field where the paper and the released code disagree is documented with both values
(docs/method.md §10); the defaults here follow the paper where it is explicit and the code
where the paper is silent.
"""

import ml_collections
from ml_collections.config_dict import FieldReference


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0  # every random mask, shuffle and init derives from this key

    # ---------------------------------------------------------------- data
    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic"  # synthetic | mvtec_ad | visa | real_iad | folder
    c.data.config = ""  # TFDS builder config (synthetic: default | tiny)
    c.data.manual_dir = ""  # the official release (mvtec_ad, visa, real_iad) or your MVTec-layout folder
    c.data.tfds_dir = "~/tensorflow_datasets"  # where prepared array_record files go (never inside manual_dir)
    c.data.classes = ()  # () = every class of the dataset
    c.data.image_size = 224  # the model's input is image_size x image_size (the geometry says how)
    # How an image of any shape becomes that square (maskad_jax/data/geometry.py): crop (the shorter side to
    # image_size, the centre kept: the released code's and the benchmarks' geometry; of a 450 x 200
    # image 44% is seen) | resize (the whole image squashed to the square) | pad (aspect kept,
    # letterboxed; the padding is left out of maps, scores and metrics).
    c.data.geometry = "crop"
    # Labelled images for F1-optimal thresholds (predict.threshold_rule; never the test set): a folder
    # of <class>/good/ and <class>/<defect>/ image folders (one class: good/ and <defect>/ directly).
    c.data.validation = ""
    # Per-class ignore regions: a folder holding <class>.png (white = ignore; the images' size or aspect),
    # zeroed in the maps before the image score, in eval, predict and export. "" = none.
    c.data.ignore_masks = ""
    # Large images as tiles (maskad_jax/data/tiling.py): (rows, cols) tiles per image, each scored by the same
    # model like an image of its own, the maps stitched back (max where tiles overlap); () = none. For
    # defects smaller than a token of the whole image (image width / 14 at 224 px). tile_overlap: the
    # share of a tile's width (height) its neighbour also covers.
    c.data.tiles = ()
    c.data.tile_overlap = 0.125
    c.data.num_workers = 0  # grain worker processes for decoding (0 = in the main process)
    c.data.eval_batch_size = 16  # images per scoring batch (1 to 1024); predict uses fewer for fewer images

    # ---------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # matmul/conv compute dtype: float32 | bfloat16 (TPU/GPU)
    c.model.backbone = ml_collections.ConfigDict()
    c.model.backbone.arch = "efficientnet-b4"  # paper: B4 (272 channels); any of B0-B7, Lite0-Lite4
    # "packaged" (Lite0; Lite1 and Lite2 with the [lite12] extra; offline), "random" (tests), a .pth /
    # .safetensors file, or an orbax dir made by `python -m maskad_jax.models.convert_weights`.
    c.model.backbone.weights = "weights/efficientnet-b4"
    c.model.backbone.padding = "static"  # static (lukemelas/UniAD, the paper's features) | tf-same
    c.model.backbone.strides = (2, 4, 8, 16)  # taps: the last block at each of these strides
    # How depthwise convolutions run, for this backbone and the flow's: auto (shifted multiply-adds on
    # a CPU, where XLA's grouped convolution is 5-7x slower for B4; the convolution op on GPU/TPU) |
    # conv | shifts. The same weights and results (tested); not part of the checkpoint fingerprint.
    c.model.backbone.depthwise = "auto"

    c.model.reconstructor = ml_collections.ConfigDict()
    c.model.reconstructor.embed_dim = 768
    c.model.reconstructor.encoder_depth = 5  # paper: 5 encoder + 5 decoder; code: one stack of 10
    c.model.reconstructor.decoder_depth = 5
    c.model.reconstructor.num_heads = 12
    c.model.reconstructor.mlp_ratio = 4.0
    c.model.reconstructor.drop_path = 0.1  # stochastic depth, rising linearly over the blocks
    c.model.reconstructor.layer_scale_init = 0.1
    # Attention kernel (same parameters and formula; switchable on a trained checkpoint): einsum
    # (explicit, float32 softmax) | jax_xla (jax.nn.dot_product_attention via XLA) | jax_cudnn (its
    # cuDNN fused kernel: NVIDIA GPUs with model.dtype bfloat16; scoring only, as its backward does
    # not take 197 tokens: training then uses einsum). benchmarks/RESULTS.md compares them.
    c.model.reconstructor.attention = "einsum"

    # ---------------------------------------------------------------- training
    c.train = ml_collections.ConfigDict()
    c.train.epochs = 600  # paper and code
    c.train.batch_size = 80  # global batch; paper and code (the code's shell script says 100)
    c.train.lr = 1.5e-3  # code (paper silent); not scaled by batch size
    c.train.min_lr = 1e-5
    c.train.warmup_epochs = 10  # linear from 0, then cosine to min_lr, per step
    c.train.weight_decay = 0.04  # paper 0.04; code 0.05. Not on biases, norms, layer scales, cls token
    c.train.clip_norm = 3.0
    # Regression target: "same" = h of the normalised image (paper); "unnormalized" = features of the
    # unnormalised [0, 1] image (released code, docs/method.md §5.2).
    c.train.target = "same"
    # Training mask strategy drawn per sample with these probabilities: (random, block, foreground).
    # Code: (0.5, 0.5, 0). The paper names all three without probabilities: equal thirds is our choice.
    c.train.mask_probs = (1 / 3, 1 / 3, 1 / 3)
    c.train.random_ratio = 150 / 196  # code: exactly 150 of 196 patches
    c.train.block_ratio = 70 / 196  # code: 70 of 196 patches in BEiT blocks
    c.train.foreground_ratio = 150 / 196
    # Feature cache placement: when the cached features (and targets) take at most this many GiB and
    # the run has one process, they are copied once to every device and each step gathers its batch
    # there (no per-step host-to-device copy: what keeps a GPU busy). Otherwise, and always with
    # several processes, each step gathers its batch on the host. 0 = always on the host.
    c.train.device_cache_gb = 4.0
    # Devices the training steps (reconstructor and flow) are spread over: all (every device of every
    # process) | one (one per process) | auto (one on a CPU, all on GPUs/TPUs). On a CPU the forced
    # host devices of run.py all-reduce through XLA's in-process rendezvous, which has aborted long
    # runs (SIGABRT, "Termination timeout for all reduce") when steps were queued ahead; one device has
    # no collective at all. It costs some speed on the CPU-sized model (the demo 11%, rope 7% of wall
    # time: benchmarks/RESULTS.md); `all` on a CPU runs one step at a time and is the faster opt-in.
    # Feature extraction and scoring have their own placement (no collectives there).
    c.train.devices = "auto"
    c.train.log_every = 50  # steps between console/JSON-lines logs
    # Learning curves (maskad_jax/training/learning_curves.py): every eval_every epochs (0 = off), the seven
    # metrics of each Table-2 row in eval_rows (maskad_jax/engine/ablations.py) on a fixed subset of at most
    # eval_images test images, and the training loss on the subset's normal images, to the console,
    # train_log.jsonl and TensorBoard. For watching training, not for choosing a checkpoint.
    c.train.eval_every = 0
    c.train.eval_rows = ("default", "full", "rec_only", "mpo_only")
    c.train.eval_images = 64
    c.train.checkpoint_every = 1000  # steps between checkpoints (and one at the end)
    c.train.max_to_keep = 3

    # ---------------------------------------------------------------- flow M_po (scoring.mpo = "flow")
    # A conditional normalizing flow over the residual between each position's feature and its nearest
    # nominal pool token (docs/method.md §6.1, PMAD's ProtoFlow), trained after the reconstructor and the
    # fit (maskad_jax/models/flow.py, flow_fit.py). Defaults: the released code's sizes and recipe.
    c.flow = ml_collections.ConfigDict()
    # Flow features. reconstructor: the main backbone's h (14 x 14) and the fit's pools. backbone: a
    # second backbone (flow.backbone) at the strides given, 3x3 average pooled, coarser taps repeated
    # onto the finest (the released code: B6 at strides 8 and 16, 28 x 28 x 272), with its own pool.
    c.flow.features = "reconstructor"
    c.flow.backbone = ml_collections.ConfigDict()
    c.flow.backbone.arch = "efficientnet-b6"  # code: timm tf_efficientnet_b6 (AutoAugment weights)
    c.flow.backbone.weights = "weights/efficientnet-b6"  # as model.backbone.weights
    c.flow.backbone.padding = "tf-same"  # timm's tf_ models use TensorFlow "same" padding
    c.flow.backbone.strides = (8, 16)
    c.flow.pool_ratio = 0.01  # the flow backbone's own nominal pool (k-center), code: 0.01
    c.flow.blocks = 8  # AllInOneBlock-style coupling blocks
    c.flow.cond_dim = 128  # 2-D sin/cos positional encoding (a multiple of 4)
    c.flow.hidden_ratio = 2.0  # subnet hidden width / subnet input width (code: 528 / 264)
    c.flow.clamp = 1.9  # affine clamping of the log-scales
    c.flow.clamp_form = "current"  # current FrEIA: clamp*tanh(a/clamp); legacy (FrEIA 0.2): clamp*tanh(a)
    c.flow.epochs = 200  # code: 25 meta-epochs x 8 sub-epochs (with augmentation; none here)
    c.flow.batch_size = 32  # images per step (all their positions)
    c.flow.lr = 2e-4  # Adam; linear warm-up from lr/10 over warmup_epochs, then cosine to 0
    c.flow.warmup_epochs = 2
    c.flow.log_every = 50
    c.flow.checkpoint_every = 1000
    c.flow.max_to_keep = 2
    c.flow.device_cache_gb = 4.0  # as train.device_cache_gb, for the cached residuals

    # ---------------------------------------------------------------- fit (after training)
    c.fit = ml_collections.ConfigDict()
    c.fit.pool_ratio = 0.1  # nominal pool = this fraction of the training tokens (greedy k-center)
    c.fit.projection_dim = 128  # random projection for k-center distances (0 = exact features)
    c.fit.per_class = True  # one pool per class (class identity at test, as the released code); False = shared
    c.fit.calibration_fraction = 0.2  # normal training images held out of the pool for M_po statistics
    # Thresholds rest on held-out scores. 0: cross-fitted over as many folds as it takes for every
    # good training image to be held out once (each fold holds out calibration_fraction of a class's
    # images, fits pools on the rest and scores the held-out ones; the pools that score at test time
    # are fold 0's, so every calibration score comes from a pool of the size that scores). A class of
    # 24 images then gets a threshold from 24 scores, not 5. k >= 1: the first k folds only (1: one
    # held-out set, as before; each further fold costs a k-center fit and scoring its images). The
    # term statistics of scoring.mpo_fusion = sum stay fold 0's, so the scores do not change.
    c.fit.calibration_folds = 0
    # Cap on the tokens entering k-center per pool (a random subset above it): k-center costs about
    # pool_ratio x tokens^2 distance evaluations (120k tokens: 50 s on 2 CPU cores). The earlier cap
    # of 50k cut magnetic tiles' 120k tokens to a 5k pool and cost M_po 5.6 points of image AUROC
    # (docs/results.md); 250k keeps every token of MVTec-AD and VisA classes.
    c.fit.max_pool_tokens = 250000
    # The fine pools of scoring.knn_fine: the backbone's taps at these strides, each 3 x 3 average
    # pooled, the coarser repeated onto the finest (the released code's M_po embedding: B6 at strides
    # 8 and 16, 28 x 28 at 224 px; here the main backbone's own taps, from the same pass), k-center
    # at fine_pool_ratio (the released code's coreset ratio for M_po, 0.01) over at most
    # max_pool_tokens tokens per class. docs/reproducibility.md.
    c.fit.fine_strides = (8, 16)
    c.fit.fine_pool_ratio = 0.01
    # How the coarser fine tap joins the finest grid: repeat (the released code's embedding: each
    # coarse vector copied onto the fine positions it covers) | bilinear (PatchCore's: interpolated
    # with half-pixel centres). models/features.pooled_embedding; measured in docs/results.md.
    c.fit.fine_join = "repeat"

    # ---------------------------------------------------------------- test-time scoring
    c.scoring = ml_collections.ConfigDict()
    # M_po: knn (distance to the nearest pool token / calibration mean) | flow (1 - exp(min(L - L_ref, 0))
    # from the flow's per-position log-likelihood L, see c.flow and flow_fit.py) | none (no final
    # weighting; the prototype masks still use the knn map).
    c.scoring.mpo = "knn"
    # calibration: divide by the mean distance of held-out normal training tokens (an image is scored
    # on its own; flow: L_ref = the max L over held-out normal images). test_max: the max over the
    # class's whole test set (the released code's transductive normalisation; eval only).
    c.scoring.mpo_normalisation = "calibration"
    # knn M_po on two grids (ours): the token-grid distance above and the same distance on the finer
    # grid of fit.fine_strides (the released code's M_po resolution), each over its held-out normal
    # scale; M_po = their mean, on the finer grid. The two grids miss different defects (per defect
    # type in docs/results.md). The prototype masks and the reference still use the token grid.
    c.scoring.knn_fine = False
    c.scoring.prototype_ratios = (0.01, 0.03, 0.05, 0.07)  # top-k by M_po: 1/5/9/13 of 196 patches
    c.scoring.num_random = 4
    c.scoring.random_ratio = 0.2  # 39 of 196
    c.scoring.num_block = 4
    c.scoring.block_ratio = 0.15  # 29 of 196
    c.scoring.zero_mask = True  # paper: N = 3n + 1 = 13 with the zero mask; code: 12 without
    c.scoring.squared_error = False  # paper: squared L2 per patch; code: L2 norm
    # Units of the per-patch errors before Rec and AssDis. absolute (paper and code): the raw L2 errors.
    # reference (ours; the CPU-sized configs' default, variants.cpu): each patch's 2N errors divided by
    # the mean of its N reference-branch errors, so Rec = Rec_h / Rec_r and AssDis is the OT between
    # the two samples on that scale: how a patch reconstructs relative to its nominal reference under
    # the same masks, which removes how predictable the position is in itself (the paper's stated
    # purpose of the reference branch). Measured in docs/results.md. Needs use_reference; without it
    # the errors stay absolute.
    c.scoring.error_units = "absolute"
    # The terms of (Rec + AssDis) x M_po (Table 2's switches; maskad_jax/engine/ablations.py names the rows).
    # use_reference: the reference branch r (needed by AssDis and by error_units = reference).
    c.scoring.use_reference = True
    c.scoring.use_assdis = True  # the paper's full formula; the CPU-sized configs turn it off (variants.cpu)
    c.scoring.use_rec = True
    c.scoring.use_mpo = True
    # Association discrepancy. paper: per-patch N x N OT between the 1-D error samples of h and r,
    # cost |e_h - e_r|. code: one OT over the patches of an image, cosine cost between N-vectors.
    c.scoring.ot = "paper"
    # Entropic regularisation. paper OT: a fraction of the mean of each patch's N x N cost matrix (the
    # solver is then accurate to ~0.3% of the errors' scale at any error scale, association.py);
    # code OT: the absolute epsilon of the released code (0.1, set by the code variant).
    c.scoring.epsilon = 0.02
    # paper OT: the most Sinkhorn iterations (it stops earlier when the marginals agree to 1e-3; a patch
    # whose duality gap stays above 1% falls back to the exact 1-D optimum and is counted in the log).
    # code OT: the released code's own rule (tol 0.1, max 1000) applies instead.
    c.scoring.sinkhorn_iterations = 200
    # ot = paper: solve the patches' OT problems one after another (lax.map) instead of together
    # (vmap). The same values to float rounding; slower. The ONNX export sets it (docs/deploy.md).
    c.scoring.ot_sequential = False
    # Combination. paper: (Rec + AssDis) x M_po. code: (0.6 x 1e4 x AssDis + 0.4 x Rec) x M_po.
    c.scoring.combine = "paper"
    c.scoring.ot_weight = 0.6
    c.scoring.ot_scale = 1e4
    # How M_po joins P (the combination above). product: P x M_po (paper and code). sum (ours): z(P) +
    # z(M_po), each term in units of the mean and standard deviation of its values on the held-out
    # normal images' patches of the class (fit's term_stats, computed after training), so neither
    # term's scale decides its weight. Measured in docs/results.md.
    c.scoring.mpo_fusion = "product"
    # The pixel map. score: the map whose max is the image score (paper). mpo: M_po's own map (ours;
    # the CPU-sized configs): at CPU scale the 14 x 14 reconstruction term adds patch noise to the
    # maps and lowered every pixel metric on the development sets (docs/results.md), while it helps
    # the image score. Image scores are the same either way.
    c.scoring.pixel_map = "score"
    c.scoring.sigma = 4.0  # Gaussian smoothing of the pixel map (reflect, truncate 4 sigma)
    c.scoring.test_drop_path = False  # code: the ViT stays in train mode at test (stochastic)
    # The 2N reconstructions of a batch run as one batched call (0) or, inside the same program, in
    # sequential groups of this many branches x batch images: smaller groups keep the attention
    # tensors in cache on a CPU (benchmarks/RESULTS.md); 0 suits GPUs/TPUs.
    c.scoring.branches_per_step = 0
    # Devices a scoring batch is spread over: all | one | auto (one on a CPU, all on GPUs/TPUs). On a
    # CPU the forced host devices (run.py) help the backbone but the scoring program runs faster on
    # one device using every core (benchmarks/RESULTS.md); eval_batch_size must divide by the count.
    # Always this process's devices: with several processes each scores its share of the images.
    c.scoring.devices = "auto"

    # ---------------------------------------------------------------- evaluation
    c.eval = ml_collections.ConfigDict()
    # exact: every pixel sorted (docs/metrics.md); binned: pixel metrics from eval.bins equal bins, memory
    # independent of the test-set size (Real-IAD); ader: the published protocol's approximations.
    c.eval.protocol = "exact"
    c.eval.bins = 1 << 16
    # Where the metrics are computed. input: the model's input frame (the paper's protocol: the
    # centre crop at image_size). image: the whole image at image_size x image_size (maps taken back
    # through the geometry; what a crop did not see scores the map's minimum), so geometries compare
    # on the same pixels. auto: input for crop, image otherwise.
    c.eval.frame = "auto"

    # ---------------------------------------------------------------- update (--mode=update)
    # New good images joining a trained workdir's pools, the reconstructor untouched (maskad_jax/app/update.py).
    c.new_images = ml_collections.ConfigDict()
    c.new_images.input = ""  # a folder (recursive) or an image of new good parts
    c.new_images.class_name = ""  # the class they show; "" when the model has one class

    # ---------------------------------------------------------------- serve (--mode=serve)
    # The HTTP service over <workdir>/export (maskad_jax/runtime/serve_http.py; the same as export/serve.py --http).
    c.serve = ml_collections.ConfigDict()
    c.serve.port = 8080
    c.serve.host = "127.0.0.1"  # this machine only; 0.0.0.0 for every interface (behind a proxy: docs/deploy.md)
    c.serve.max_batch = 16  # model inputs (tiles counted) per call of the compiled program
    c.serve.max_wait_ms = 5.0  # how long a batch waits for more requests once one is queued
    c.serve.max_bytes = 20_000_000  # the largest image accepted
    c.serve.max_images = 32  # the most images in one request
    # What a request costs is bounded by pixels (a 90 KB PNG can hold 9400 x 9400 pixels): each image's size
    # is read from its header first. With the defaults the smoke model's service peaked at 1.8 GB under the
    # load test (benchmarks/serve_load.py, RESULTS.md); 413 over a per-image or per-request limit, 503 with
    # Retry-After when the images being worked on would pass max_inflight_pixels.
    c.serve.max_pixels = 40_000_000  # the largest image, width x height (a 7300 x 5500 photo)
    c.serve.max_request_pixels = 100_000_000  # the most pixels in one request's images together
    c.serve.max_inflight_pixels = 200_000_000  # the most pixels being worked on, all requests together
    c.serve.max_request_bytes = 100_000_000  # the largest request body, counted as it arrives (chunked too)
    c.serve.max_queue = 256  # the most requests waiting to be scored (then 503 with Retry-After)
    c.serve.display_size = 1024  # ?maps=1: the map and overlay's longest side, at most (PNG, for display)
    c.serve.token_file = ""  # a file holding the bearer token every /v1 and /metrics request must carry
    c.serve.runtime = "auto"  # auto | stablehlo | onnx

    # ---------------------------------------------------------------- predict
    c.predict = ml_collections.ConfigDict()
    c.predict.input = ""  # an image or a folder (recursive)
    c.predict.class_name = ""  # the pool to score against; "" = the nearest pool, image by image
    # Decision thresholds (maskad_jax/training/thresholds.py). predict.threshold fixes them: a number for every
    # class (< 0: none fixed), or per class, {"screw": 0.5} or "screw=0.5,nut=0.7" (the rest keep the
    # rule). threshold_rule: quantile (the threshold_quantile quantile of normal held-out scores: 0.99
    # is about 1% false alarms on good parts), f1 (F1-optimal on data.validation's labelled images),
    # auto (f1 where a class has validation images, else quantile).
    c.predict.threshold = FieldReference(-1.0, field_type=object)
    c.predict.threshold_quantile = 0.99
    c.predict.threshold_rule = "auto"

    # ---------------------------------------------------------------- export (--mode=export, docs/deploy.md)
    # The scoring program as StableHLO (jax.export) with the trained state baked in, for these XLA
    # platforms (one artifact serves all of them; lowering needs no such device here).
    c.export = ml_collections.ConfigDict()
    c.export.platforms = ("cpu", "cuda", "tpu")
    # The same program as ONNX (scorer.onnx, through jax2onnx) for onnxruntime: "auto" = when jax2onnx
    # is installed (the log says when it is not), "yes" = an error without it, "no" = StableHLO only.
    c.export.onnx = "auto"
    # scorer.onnx takes batches of exactly this many images (jax2onnx 0.17.1 cannot keep the batch
    # symbolic for this program); serve.py pads a short last batch by repeating its last image.
    c.export.onnx_batch = 1
    return c
