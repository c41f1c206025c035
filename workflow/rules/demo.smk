# The embedded demo cohort: slides generated here (pyramidal TIFF with mpp), so `make demo` needs no network.
rule demo_slide:
    output:
        "resources/demo/{demo_slide}.tiff",
    params:
        args=lambda wc: [f"--{k}={config['demo']['slides'][wc.demo_slide][k]}" for k in ("width", "height", "mpp", "seed")],
    log:
        "logs/demo/{demo_slide}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress demo-slide {output:q} {params.args:q} > {log:q} 2>&1"
