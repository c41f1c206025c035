rule train:
    input:
        synth=lambda wc: [synth_shards(t) for t in train_types()],
    output:
        weights="results/models/{model_name}/model.pt",
        card="results/models/{model_name}/model_card.json",
    params:
        flags=cfg_flags({**config["model"]["train"], "mpp": config["mpp_work"]}),
    threads: config["model"].get("threads", 2)
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        gpu=config["gpus_per_job"],
    retries: 1
    log:
        "logs/train/{model_name}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress train --synth {input.synth} --out-dir $(dirname {output.weights}) "
        "{params.flags} > {log} 2>&1"
