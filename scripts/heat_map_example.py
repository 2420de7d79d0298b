"""Draw the README's example of heat maps: sample photos with the heat of the model's answer blended in, side by side.

    python scripts/heat_map_example.py --model artifacts/model --out nbs/images/heat_maps.jpg

Uses the first cat and dog photos of ../shared/data/PetImages-mini, one composite (a dog beside a photo of something
else from ../shared/data/not-cats-dogs) and one photo of neither; each tile is titled with the answer it explains."""
import argparse
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from catsdogs.config import InferenceSettings
from catsdogs.inference import Predictor, heat_picture
from catsdogs.presets import load_image, sample_photos, shared_sample

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", type=Path, required=True, help="A model artifact with heat maps")
parser.add_argument("--out", type=Path, default=Path("nbs/images/heat_maps.jpg"))
parser.add_argument("--tile", type=int, default=240, help="Height of each picture, in pixels")
args = parser.parse_args()

others = shared_sample("not-cats-dogs")
cat, dog = sample_photos("cat", 3)[2], sample_photos("dog", 3)[1]
beside = ImageOps.fit(load_image(sorted((others / "martinwestin" / "flower").glob("*.jpg"))[0]), (384, 384))
beside.paste(ImageOps.fit(load_image(sample_photos("dog", 6)[5]), (192, 384)), (192, 0))
composite = io.BytesIO(); beside.save(composite, format="JPEG", quality=92)
neither = sorted((others / "experiencor" / "kangaroo").glob("*.jpg"))[0]
sources = [cat.read_bytes(), dog.read_bytes(), composite.getvalue(), neither.read_bytes()]

predictor = Predictor(args.model, InferenceSettings())
tiles = []
for source, answer in zip(sources, predictor.predict_batch(sources, explain=True)):
    picture = heat_picture(load_image(source), answer.explanation, predictor.settings.heat_map_opacity)
    picture = picture.resize((round(picture.width * args.tile / picture.height), args.tile))
    tile = Image.new("RGB", (picture.width, args.tile + 26), "white")
    tile.paste(picture, (0, 26))
    ImageDraw.Draw(tile).text((4, 5), f"{answer.label} ({answer.confidence:.0%})", fill="black", font_size=17)
    tiles.append(tile)
sheet = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), tiles[0].height), "white")
x = 0
for tile in tiles: sheet.paste(tile, (x, 0)); x += tile.width + 8
args.out.parent.mkdir(parents=True, exist_ok=True)
sheet.save(args.out, quality=85)
print(f"{args.out}: {sheet.size[0]}x{sheet.size[1]}, {args.out.stat().st_size // 1024} KB, engine {predictor.run.name}")
