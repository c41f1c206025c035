def download_input(wildcards):
    """Local sources are real inputs (so a rule can make them, e.g. the demo slides)."""
    source = SLIDE_ROWS[wildcards.slide_id]["source"]
    if "://" in source or _is_uuid(source):
        return []
    return [source]


def _is_uuid(text):
    import re

    return re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", text) is not None


def download_flags(wildcards):
    row = SLIDE_ROWS[wildcards.slide_id]
    flags = [f"--api-url {config['gdc']['api_url']}", f"--retries {config['download']['retries']}",
             f"--on-failure {config['download']['on_failure']}"]
    if row.get("md5"):
        flags.append(f"--md5 {row['md5']}")
    if row.get("size"):
        flags.append(f"--size {int(float(row['size']))}")
    if not config["download"]["link_local"]:
        flags.append("--copy")
    return " ".join(flags)


rule download:
    input:
        download_input,
    output:
        slide_path("{slide_id}") if config["keep_slides"] else temp(slide_path("{slide_id}")),
    params:
        source=lambda wc: SLIDE_ROWS[wc.slide_id]["source"],
        flags=download_flags,
    log:
        "logs/download/{slide_id}.log",
    resources:
        gdc_connections=1,
    retries: 2
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress download --source '{params.source}' --out {output} "
        "--slide-id {wildcards.slide_id} {params.flags} > {log} 2>&1"
