"""A pipeline saved with a dmlab scheduler reloads with it (``model_index.json`` names ``DmlabScheduler`` in
``dmlab`` or ``dmlab.samplers.diffusers_compat``, depending on the diffusers version: both resolve)."""
import json
import pickle

import pytest
import torch

pytest.importorskip("diffusers")


def test_pipeline_with_dmlab_scheduler_round_trips(tmp_path, unet):
    from diffusers import DDPMPipeline, DDPMScheduler

    import dmlab
    from dmlab.samplers.diffusers_compat import DmlabScheduler, as_diffusers_scheduler

    sch = as_diffusers_scheduler("dpmpp_3m", DDPMScheduler(prediction_type="v_prediction"), variant="taylor")
    assert type(sch) is DmlabScheduler is dmlab.DmlabScheduler
    assert pickle.loads(pickle.dumps(sch)).config == sch.config  # a module-level class pickles
    pipe = DDPMPipeline(unet=unet, scheduler=sch)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    lib, name = json.loads((tmp_path / "model_index.json").read_text())["scheduler"]
    assert lib.split(".")[0] == "dmlab" and name == "DmlabScheduler"  # dmlab or its module, by diffusers version
    again = DDPMPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(again.scheduler) is DmlabScheduler and public(again.scheduler.config) == public(sch.config)
    run = lambda p: p(batch_size=1, num_inference_steps=5, generator=torch.Generator().manual_seed(0),  # noqa: E731
                      output_type="np").images
    base = run(pipe)
    assert (run(DDPMPipeline(unet=unet, scheduler=again.scheduler)) == base).all()  # the scheduler exactly
    assert abs(run(again) - base).max() < 1e-4  # the whole pipeline (a reloaded UNet differs in rounding only)
