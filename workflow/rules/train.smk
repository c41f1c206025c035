rule train:
    input:
        synth=lambda wc: [synth_shards(t) for t in train_types()],
    output:
        weights="results/models/{model_name}/model.pt",
        card="results/models/{model_name}/model_card.json",
    params:
        out_dir=lambda wc: f"results/models/{wc.model_name}",
        args=cfg_args({**config["model"]["train"], "mpp": config["mpp_work"]}),
    threads: config["model"].get("threads", 2)
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        gpu=config["gpus_per_job"],
    retries: 1
    wildcard_constraints:
        # Only the configured model is trained here: another model under results/models/<other>/ is never
        # rebuilt with this config's settings.
        model_name=re.escape(config["model"]["name"]),
    log:
        "logs/train/{model_name}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress train --synth {input.synth:q} --out-dir {params.out_dir:q} "
        "{params.args:q} > {log:q} 2>&1"


rule adapt:
    """Label-free adaptation of the configured model to one cancer type's own tissue (model.adapt: true):
    importance weights of that type's synthetic patches against its real ones, then self-training."""
    input:
        synth=lambda wc: synth_shards(wc.cancer_type),
        init=base_weights(),
    output:
        weights="results/models/adapted/{cancer_type}/model.pt",
        card="results/models/adapted/{cancer_type}/model_card.json",
    params:
        out_dir=lambda wc: f"results/models/adapted/{wc.cancer_type}",
        args=cfg_args({k: v for k, v in config["model"]["train"].items() if k not in ("base", "depth", "max_steps")}),
    threads: config["model"].get("threads", 2)
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        gpu=config["gpus_per_job"],
    retries: 1
    log:
        "logs/adapt/{cancer_type}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress adapt --init {input.init:q} --synth {input.synth:q} --out-dir {params.out_dir:q} "
        "{params.args:q} > {log:q} 2>&1"
