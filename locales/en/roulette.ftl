roulette-intro = Spin the wheel and win a discount! You have 3 spins.
roulette-btn-spin = Spin!
roulette-btn-again = Spin again
roulette-btn-claim = Get my code
roulette-prize-10 = 10% off
roulette-prize-25 = 25% off
roulette-prize-shipping = free shipping
roulette-prize-nothing = nothing this time
roulette-won = You won { $prize_label }! Tap the button to get your code.
roulette-code = Your code: { $prize_code }. Use it at checkout.
roulette-lost = Not this time. Try again!
roulette-no-spins = You have used all your spins. Invite a friend for one more: https://t.me/ExampleShopBot?start={ $referral_ref }
roulette-out = Sorry, we are out of prizes. Thank you for playing!
