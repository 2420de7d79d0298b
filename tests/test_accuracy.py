"""An accuracy floor in the default test run: the test run's model (EfficientNet-Lite0, frozen-stage training on the
sample at 224 px) on photos it never saw, measured as served (`evaluate_folder` through the `Predictor`, ONNX Runtime)."""
from catsdogs.data import load_prepared
from catsdogs.evaluation import evaluate_folder
from catsdogs.config import InferenceSettings
from catsdogs.inference import Predictor


def test_accuracy_floor_on_photos_the_model_never_saw(sample_model, tmp_path):
    """Far above what a constant or random answer scores (50% accuracy, log loss 0.69): at 224 px and two epochs
    of the head this recipe scored 97.5% on the sample's test split (log loss 0.059, ROC AUC 0.998; 98.5% at the
    default 288 px with fine-tuning)."""
    prepared = load_prepared(sample_model / "data")
    test = prepared.split("test")
    for path, label in zip(test.path, test.label):
        link = tmp_path / label / path.replace("/", "_"); link.parent.mkdir(exist_ok=True); link.symlink_to(prepared.root / path)
    metrics = evaluate_folder(Predictor(sample_model, InferenceSettings(backend="onnx")), tmp_path, progress=False)
    assert metrics["n_images"] == len(test) >= 150
    assert metrics["accuracy"] >= 0.92 and metrics["log_loss"] <= 0.25 and metrics["roc_auc"] >= 0.97, metrics
