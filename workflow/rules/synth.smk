def texture_dir_flags():
    dirs = config["synth"].get("texture_dirs") or []
    return " ".join(f"{d['path']}:{d['mpp']}" for d in dirs)


rule synth:
    input:
        patches=lambda wc: per_slide("results/{cancer_type}/{slide_id}/patches.npz", wc.cancer_type),
    output:
        shards=directory("results/synth/{cancer_type}/shards"),
        sheet=report(
            "results/synth/{cancer_type}/contact_sheet.png",
            category="Synthetic data",
            labels={"cancer type": "{cancer_type}"},
        ),
    params:
        flags=cfg_flags({**config["synth"]["params"], "mpp": config["mpp_work"]}),
        texture_dirs=texture_dir_flags(),
    threads: config["synth"].get("threads", 2)
    log:
        "logs/synth/{cancer_type}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress synth --patches {input.patches} "
        "$([ -n '{params.texture_dirs}' ] && echo --texture-dir {params.texture_dirs}) "
        "--out-dir {output.shards} --contact-sheet {output.sheet} --workers {threads} {params.flags} "
        "> {log} 2>&1"
