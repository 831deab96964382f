"""`kltd make-data KEY=VALUE ...`: responses sampled from a model, written as JSONL (kltd.train.make_data).

It takes the same data= and model= groups and keys as `kltd train`, plus its own (conf/make_data.yaml):

    kltd make-data out=data/student.jsonl n=5000 sampling.temperature=1.0
    kltd make-data out=data/teacher.jsonl writer=teacher data=file data.path=train.jsonl
"""

from __future__ import annotations


from hydra.core.config_store import ConfigStore

from kltd.schema.config import ConfigError, MakeDataConfig

ConfigStore.instance().store(name="kltd_make_data_schema", node=MakeDataConfig)


def main(argv: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from kltd.app.compose import composition_error, config_dir, fail
    from kltd.data.formats import DataError
    from kltd.train.make_data import make_data

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("make_data", overrides=argv))
    except (HydraException, OmegaConfBaseException) as error:
        fail(composition_error(error))
    try:
        make_data(cfg)
    except (ConfigError, DataError, ValueError, OSError) as error:
        fail(str(error))
