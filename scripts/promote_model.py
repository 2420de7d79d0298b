"""Point a registry alias at a model version, so `catsdogs_serve --model models:/catsdogs@champion` serves it.

    python scripts/promote_model.py 3                      # catsdogs@champion -> version 3
    python scripts/promote_model.py 3 --alias staging --name catsdogs --tracking-uri sqlite:///mlflow.db

Then reload running servers: `curl -X POST -H "Authorization: Bearer $CATSDOGS_ADMIN_TOKEN" http://HOST:8000/admin/reload`.
The tracking URI defaults to MLFLOW_TRACKING_URI, else the local sqlite:///mlflow.db of `catsdogs_train`."""
import argparse

from catsdogs.config import Settings
from catsdogs.inference import promote

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("version", type=int, help="Model version to promote")
parser.add_argument("--alias", default="champion", help="Alias to set (default: champion)")
parser.add_argument("--name", default=None, help="Registered model name (default: Settings.registered_model_name)")
parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: Settings.mlflow_tracking_uri)")
args = parser.parse_args()
settings = Settings()
name, uri = args.name or settings.registered_model_name, args.tracking_uri or settings.mlflow_tracking_uri
promote(args.version, args.alias, name, uri)
print(f"{name}@{args.alias} -> version {args.version} ({uri})")
