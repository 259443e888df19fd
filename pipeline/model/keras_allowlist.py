"""What a Keras configuration may name before a Keras loader is allowed to read it.

A ``.keras`` file's ``config.json`` (and an ``.h5`` file's ``model_config``)
names every object the loader will import and construct: its ``module``,
``class_name`` and ``registered_name``, nested to any depth. tf_keras imports
whatever module a configuration names, and some classes run code as they are
built: ``Lambda`` (marshalled bytecode), ``TFSMLayer`` and tf_keras's
``ReloadedLayer`` (they load a SavedModel, which runs its initializers),
``TFOpLambda`` (any TensorFlow API function by name), the lookup layers (they
read a vocabulary file named in the config). So nothing is refused by name
here: every object must be one of Keras's own classes that hold numbers and
settings only (layers, initializers, regularizers, constraints, activations,
dtype policies, the models that hold them, the tensor operations of
``keras.src.ops`` a functional graph records, the helper layers Keras's own
applications define, tfmot's quantization wrappers for QAT models). Anything
else, including every custom object, is refused before Keras sees the file.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator

# keras.layers (Keras 3) and tf_keras.layers classes that hold weights and settings and run nothing of the file's.
# Left out on purpose: Lambda, TFSMLayer, JaxLayer, FlaxLayer, TorchModuleWrapper (code), TFOpLambda and
# SlicingOpLambda (call any TensorFlow function by name), StringLookup, IntegerLookup, TextVectorization (read a
# vocabulary file named in the config), DenseFeatures, and the base classes Layer and Wrapper.
LAYERS = frozenset("""
Activation ActivityRegularization AdaptiveAveragePooling1D AdaptiveAveragePooling2D AdaptiveAveragePooling3D
AdaptiveMaxPooling1D AdaptiveMaxPooling2D AdaptiveMaxPooling3D Add AdditiveAttention AlphaDropout Attention AugMix
AutoContrast Average AveragePooling1D AveragePooling2D AveragePooling3D AvgPool1D AvgPool2D AvgPool3D
BatchNormalization Bidirectional CenterCrop Concatenate ContrastLimitedAdaptiveHistogramEqualization
Conv1D Conv1DTranspose Conv2D Conv2DTranspose Conv3D Conv3DTranspose ConvLSTM1D ConvLSTM2D ConvLSTM3D
Convolution1D Convolution1DTranspose Convolution2D Convolution2DTranspose Convolution3D Convolution3DTranspose
Cropping1D Cropping2D Cropping3D CutMix Dense DepthwiseConv1D DepthwiseConv2D Discretization Dot Dropout ELU
EinsumDense Embedding Equalization Flatten GRU GRUCell GaussianDropout GaussianNoise
GlobalAveragePooling1D GlobalAveragePooling2D GlobalAveragePooling3D GlobalAvgPool1D GlobalAvgPool2D GlobalAvgPool3D
GlobalMaxPool1D GlobalMaxPool2D GlobalMaxPool3D GlobalMaxPooling1D GlobalMaxPooling2D GlobalMaxPooling3D
GroupNormalization GroupQueryAttention Identity InputLayer LSTM LSTMCell LayerNormalization LeakyReLU
LocallyConnected1D LocallyConnected2D Masking MaxNumBoundingBoxes MaxPool1D MaxPool2D MaxPool3D
MaxPooling1D MaxPooling2D MaxPooling3D Maximum Minimum MixUp MultiHeadAttention Multiply Normalization PReLU Permute
Pipeline RMSNormalization RNN RandAugment RandomBrightness RandomColorDegeneration RandomColorJitter RandomContrast
RandomCrop RandomElasticTransform RandomErasing RandomFlip RandomGaussianBlur RandomGrayscale RandomHeight RandomHue
RandomInvert RandomPerspective RandomPosterization RandomRotation RandomSaturation RandomSharpness RandomShear
RandomTranslation RandomWidth RandomZoom ReLU RepeatVector Rescaling Reshape Resizing
SeparableConv1D SeparableConv2D SeparableConvolution1D SeparableConvolution2D SimpleRNN SimpleRNNCell Softmax
Solarization SpatialDropout1D SpatialDropout2D SpatialDropout3D SpectralNormalization StackedRNNCells Subtract
ThresholdedReLU TimeDistributed UnitNormalization UpSampling1D UpSampling2D UpSampling3D
ZeroPadding1D ZeroPadding2D ZeroPadding3D
""".split())
MODELS = frozenset({"Functional", "Sequential", "Model"})
INITIALIZERS = frozenset("""
Constant GlorotNormal GlorotUniform HeNormal HeUniform Identity IdentityInitializer LecunNormal LecunUniform Ones
Orthogonal OrthogonalInitializer RandomNormal RandomUniform STFT STFTInitializer TruncatedNormal VarianceScaling Zeros
constant glorot_normal glorot_uniform he_normal he_uniform identity lecun_normal lecun_uniform ones orthogonal
random_normal random_uniform stft truncated_normal variance_scaling zeros normal uniform one zero
""".split())
REGULARIZERS = frozenset("L1 L1L2 L2 OrthogonalRegularizer l1 l1_l2 l1l2 l2 orthogonal_regularizer".split())
CONSTRAINTS = frozenset("MaxNorm MinMaxNorm NonNeg UnitNorm max_norm min_max_norm non_neg unit_norm".split())
DTYPE_POLICIES = frozenset("""
DTypePolicy FloatDTypePolicy DTypePolicyMap QuantizedDTypePolicy QuantizedFloat8DTypePolicy Int4DTypePolicy
GPTQDTypePolicy AWQDTypePolicy Policy
""".split())
ACTIVATIONS = frozenset("""
celu elu exponential gelu glu hard_shrink hard_sigmoid hard_silu hard_swish hard_tanh leaky_relu linear log_sigmoid
log_softmax mish relu relu6 selu sigmoid silu soft_shrink softmax softplus softsign sparse_plus sparse_sigmoid
sparsemax squareplus swish tanh tanh_shrink threshold
""".split())
# tensorflow-model-optimization's QAT wrappers and quantizers (``xedge qat`` saves them); numbers and settings only.
QUANTIZATION = frozenset("""
QuantizeAnnotate QuantizeAwareActivation NoOpActivation QuantizeWrapper QuantizeWrapperV2 QuantizeLayer
OutputOnlyConfig FixedQuantizeConfig AllValuesQuantizer FixedQuantizer LastValueQuantizer MovingAverageQuantizer
NoQuantizer NoOpQuantizeConfig Default8BitQuantizeConfig Default8BitQuantizeConfigRNN Default8BitConvQuantizeConfig
Default8BitActivationQuantizeConfig Default8BitConvTransposeQuantizeConfig Default8BitOutputQuantizeConfig
DefaultNBitQuantizeConfig DefaultNBitQuantizeConfigRNN DefaultNBitConvQuantizeConfig
DefaultNBitActivationQuantizeConfig DefaultNBitConvTransposeQuantizeConfig DefaultNBitOutputQuantizeConfig
""".split())
_TFMOT = "tensorflow_model_optimization.python.core.quantization.keras."
QUANTIZATION_MODULES = tuple(_TFMOT + m for m in (
    "quantize_aware_activation", "quantize_wrapper", "quantize_layer", "quantize_annotate", "quantizers",
    "quantize_config", "default_8bit.default_8bit_quantize_registry", "default_8bit.default_8bit_quantize_configs"))
# Layers that Keras's own applications define in their modules (ConvNeXt, InceptionResNetV2).
APPLICATION_LAYERS = {
    "keras.src.applications.convnext": frozenset({"LayerScale", "StochasticDepth"}),
    "keras.src.applications.inception_resnet_v2": frozenset({"CustomScaleLayer"}),
}
# keras.src.ops modules whose operations a functional graph records (``x + y``, ``keras.ops.softmax(x)``): tensor
# maths that takes no callable. Of keras.src.ops.core, whose control flow (cond, map, scan, loops) takes Python
# functions, only these:
OP_MODULES = ("keras.src.ops.numpy", "keras.src.ops.nn", "keras.src.ops.math", "keras.src.ops.image")
CORE_OPS = frozenset("Cast ConvertToTensor SaturateCast Slice SliceUpdate Scatter ScatterUpdate StopGradient "
                     "Unstack".split())
# Values in a configuration that are not objects: tensors, arrays, bytes, slices, ellipses.
DATA_MARKERS = frozenset({"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__slice__", "__ellipsis__"})
FUNCTION_MODULES = frozenset({"keras.activations", "keras.src.activations.activations", "builtins"})
# Where each family of objects is serialized from, in Keras 3 and tf_keras files.
_BY_MODULE = {
    "keras": LAYERS | MODELS | DTYPE_POLICIES,
    "keras.layers": LAYERS | MODELS,
    "keras.models": MODELS,
    "keras.src.models.functional": MODELS,
    "keras.src.models.sequential": MODELS,
    "keras.src.models.model": MODELS,
    "keras.initializers": INITIALIZERS,
    "keras.regularizers": REGULARIZERS,
    "keras.constraints": CONSTRAINTS,
    "keras.dtype_policies": DTYPE_POLICIES,
    "keras.mixed_precision": DTYPE_POLICIES,
    "keras.src.ops.core": CORE_OPS,
    **APPLICATION_LAYERS,
    **dict.fromkeys(QUANTIZATION_MODULES, QUANTIZATION),
}
# Objects without a module (tf_keras's .h5 format) are looked up by name among Keras's own classes.
_WITHOUT_MODULE = LAYERS | MODELS | INITIALIZERS | REGULARIZERS | CONSTRAINTS | DTYPE_POLICIES | QUANTIZATION
# String settings that a loader resolves to an object by name.
_NAMED_SETTINGS = {"activation": ACTIVATIONS | LAYERS, "recurrent_activation": ACTIVATIONS | LAYERS,
                   "_initializer": INITIALIZERS, "_regularizer": REGULARIZERS, "_constraint": CONSTRAINTS}


def disallowed_objects(config) -> list[str]:
    """Everything in a Keras configuration outside the allow-list, described for a message (empty: it may load).

    The top level's ``compile_config`` is not read: the project always loads with ``compile=False``, and both
    loaders then drop it unread."""
    return list(dict.fromkeys(_problems(config)))


def _problems(config) -> Iterator[str]:
    stack = [(config, "", True)]
    while stack:
        node, key, top = stack.pop()
        if isinstance(node, dict):
            if "class_name" in node:
                problem = _object_problem(node)
                if problem:
                    yield problem
            for k, value in node.items():
                if top and k == "compile_config":
                    continue
                if isinstance(value, str) and not _named_setting_ok(str(k), value):
                    yield f"{k} {value[:60]!r}"
                stack.append((value, str(k), False))
        elif isinstance(node, list):
            stack.extend((value, key, False) for value in node)


def _named_setting_ok(key: str, value: str) -> bool:
    for suffix, allowed in _NAMED_SETTINGS.items():
        if key == suffix.lstrip("_") or (suffix.startswith("_") and key.endswith(suffix)):
            return value in allowed
    return True


def _object_problem(node: dict) -> str | None:
    cls, module, registered = node.get("class_name"), node.get("module"), node.get("registered_name")
    inner = node.get("config")
    name = inner.get("name") if isinstance(inner, dict) else None
    described = f"{cls} layer {name!r}" if isinstance(name, str) else repr(cls)[:80]
    if not isinstance(cls, str) or not isinstance(module, str | None) or registered not in (None, cls):
        return f"{described} (registered as {registered!r})" if registered not in (None, cls) else described
    if cls in DATA_MARKERS:
        return None
    if cls == "function":
        known = module in FUNCTION_MODULES and isinstance(inner, str) and inner in ACTIVATIONS
        return None if known else f"function {str(inner)[:60]!r}"
    if cls in _allowed_in(module):
        return None
    return described if module is None or module in _BY_MODULE or module in OP_MODULES else \
        f"{described} from {module[:80]}"


def _allowed_in(module: str | None) -> frozenset[str]:
    if module is None:
        return _WITHOUT_MODULE
    if module in OP_MODULES:
        return operations(module)
    return _BY_MODULE.get(module, frozenset())


@functools.cache
def operations(module: str) -> frozenset[str]:
    """The operation classes a ``keras.src.ops`` module of ``OP_MODULES`` defines (its tensor maths).

    Read from Keras itself (some 400 classes, growing with each release) rather than copied here; only a Keras 3
    file names these modules, and loading it imports Keras next anyway."""
    from keras.src.ops.operation import Operation

    namespace = importlib.import_module(module)  # one of OP_MODULES, never a name from the file
    return frozenset(n for n, v in vars(namespace).items()
                     if isinstance(v, type) and issubclass(v, Operation) and v.__module__ == module)
