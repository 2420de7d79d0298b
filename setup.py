"""Package metadata comes from `settings.ini`, which nbdev 2 also reads (no `pkg_resources`)."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).parent / "settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

serve, registry = cfg["serve_requirements"].split(), cfg["registry_requirements"].split()
train = cfg["train_requirements"].split() + serve
extras = {"serve": serve, "registry": registry, "train": train, "dev": train + cfg["dev_requirements"].split()}

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    url=cfg["git_url"],
    python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_packages(include=["catsdogs", "catsdogs.*"]),
    package_data={"catsdogs": ["static/*"]},
    include_package_data=True,
    install_requires=cfg["requirements"].split(),
    extras_require=extras,
    entry_points={
        "console_scripts": cfg["console_scripts"].split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)
